"""Fine-tuning data: JSONL of chat messages or prompt/completion pairs, or plain text.

Reading and checking happen in the kernel, before any process starts, so a bad line is
named at once (with its line number). Tokenization happens in the training process,
with the model's own tokenizer and chat template: only the assistant's replies are
trained on; the rest of a conversation is context.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .._text import check_text, jsonl_items
from ..errors import WorkbenchError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """One example: a conversation (`messages`) or a piece of plain text (`text`)."""
    where: str                                  # "line 12 of data.jsonl", "example 3"
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    text: str = ""


def read_data(data: str | os.PathLike | Sequence[Any]) -> list[Record]:
    """The examples in `data`: a .jsonl file, a text file (one example per paragraph), or
    a list of dicts (as in JSONL) or strings. Raises a WorkbenchError naming the line."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        if not path.is_file():
            raise WorkbenchError(f"no data file at {path}",
                                 "Give a .jsonl file (messages or prompt/completion per line) "
                                 "or a .txt file.")
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise WorkbenchError(f"{path.name} is not UTF-8 text ({e.reason} at byte {e.start})",
                                 "Save the data as UTF-8.") from None
        if path.suffix.lower() in (".jsonl", ".json"):
            records = _read_jsonl(content, path.name)
        else:
            records = [Record(f"paragraph {i + 1} of {path.name}", text=p.strip())
                       for i, p in enumerate(content.split("\n\n")) if p.strip()]
        name = path.name
    else:
        records = [_record(item, f"example {i + 1}") for i, item in enumerate(data)]
        name = "the data"
    if not records:
        raise WorkbenchError(f"{name} holds no examples",
                             "Add examples: one JSON object per line, e.g. "
                             '{"prompt": "...", "completion": "..."}.')
    return records


def _read_jsonl(content: str, name: str) -> list[Record]:
    return [_record(item, where) for where, item in jsonl_items(content, name)]


def _record(item: Any, where: str) -> Record:
    r = _shape(item, where)
    for j, (_, content) in enumerate(r.messages):
        check_text(content, f"{where}, message {j + 1}")
    check_text(r.text, where)
    return r


def _shape(item: Any, where: str) -> Record:
    shape = ('Use {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", '
             '"content": "..."}]}, {"prompt": "...", "completion": "..."} or {"text": "..."}.')
    if isinstance(item, str):
        if not item.strip():
            raise WorkbenchError(f"{where} is empty", "Remove it or give it text.")
        return Record(where, text=item)
    if not isinstance(item, dict):
        raise WorkbenchError(f"{where} is a {type(item).__name__}, not an object", shape)
    if "messages" in item:
        msgs = item["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise WorkbenchError(f"{where}: messages must be a non-empty list", shape)
        out = []
        for j, m in enumerate(msgs):
            if not (isinstance(m, dict) and m.get("role") in ROLES
                    and isinstance(m.get("content"), str)):
                raise WorkbenchError(f"{where}: message {j + 1} needs a role "
                                     f"({', '.join(ROLES)}) and a string content", shape)
            out.append((m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in out):
            raise WorkbenchError(f"{where} has no assistant message to learn from",
                                 "Each conversation needs at least one assistant reply.")
        return Record(where, messages=tuple(out))
    if "prompt" in item or "completion" in item:
        p, c = item.get("prompt"), item.get("completion")
        if not (isinstance(p, str) and isinstance(c, str) and c.strip()):
            raise WorkbenchError(f"{where}: prompt and completion must both be strings "
                                 "(the completion not empty)", shape)
        system = item.get("system")
        msgs = ((("system", system),) if isinstance(system, str) and system else ())
        return Record(where, messages=msgs + (("user", p), ("assistant", c)))
    if isinstance(item.get("text"), str) and item["text"].strip():
        return Record(where, text=item["text"])
    raise WorkbenchError(f"{where} has neither messages, prompt/completion nor text", shape)


def split(records: list[Record], val_fraction: float,
          seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded shuffle, then the last `val_fraction` (at least one) for validation."""
    if len(records) < 2:
        raise WorkbenchError(f"{len(records)} example is too few to train and validate on",
                             "Give at least 2 examples (a few dozen is better).")
    if not 0 < val_fraction < 1:
        raise WorkbenchError(f"val_fraction must be between 0 and 1 (got {val_fraction})",
                             "For example 0.1.")
    order = list(records)
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    return order[:-n_val], order[-n_val:]


# ---- the training process's side ------------------------------------------------

@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    labels: list[int]   # -100 where not trained on
    where: str


def tokenize(records: list[Record], tokenizer: Any, template: str | None, bos: str, eos: str,
             max_len: int, truncate: bool) -> tuple[list[Tokenized], list[str]]:
    """Token ids and labels of each record, and the warnings (truncated, dropped)."""
    from ..worker.template import render_chat

    out: list[Tokenized] = []
    long: list[str] = []
    dropped: list[str] = []
    for r in records:
        if r.messages:
            if not template:
                raise WorkbenchError("the model has no chat template, so chat examples cannot "
                                     "be formatted", "Give plain text examples instead.")
            msgs = [{"role": role, "content": c} for role, c in r.messages]
            text = render_chat(template, msgs, bos, eos, "the base model", generation=False)
            spans = []
            for i, (role, _) in enumerate(r.messages):
                if role != "assistant":
                    continue
                before = render_chat(template, msgs[:i], bos, eos, "the base model")
                upto = render_chat(template, msgs[:i + 1], bos, eos, "the base model",
                                   generation=False)
                if not text.startswith(before) or not text.startswith(upto):
                    spans = [(0, len(text))]  # template not prefix-stable: learn it all
                    break
                spans.append((len(before), len(upto)))
        else:
            text, spans = r.text, [(0, len(r.text))]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [t if any(a <= s < b for a, b in spans) else -100
                  for t, (s, _) in zip(ids, offsets)]
        if len(ids) > max_len:
            long.append(f"{r.where} ({len(ids)} tokens)")
            if not truncate:
                continue
            ids, labels = ids[:max_len], labels[:max_len]
        if all(x == -100 for x in labels[1:]):
            dropped.append(r.where)
            continue
        out.append(Tokenized(ids, labels, r.where))
    warnings = []
    if long and not truncate:
        raise WorkbenchError(f"{len(long)} example(s) are longer than max_len={max_len} "
                             f"tokens: {_few(long)}",
                             "Shorten them, raise max_len, or pass truncate=True.")
    if long:
        warnings.append(f"{len(long)} example(s) longer than max_len={max_len} tokens were "
                        f"truncated: {_few(long)}")
    if dropped:
        warnings.append(f"{len(dropped)} example(s) had nothing left to learn after "
                        f"truncation and were dropped: {_few(dropped)}")
    return out, warnings


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
