"""Tasks that run with no network: lm-eval task configurations over local JSON Lines.

Three ship with the workbench (data/, written by scripts/make-eval-tasks.py):

| name          | kind             | documents | source, license |
|---------------|------------------|-----------|-----------------|
| wb_capitals   | multiple choice  | 116       | countries and their capitals, written for the workbench (MIT) |
| wb_docstrings | cloze (last word)| 186       | sentences of CPython 3.11's standard-library docstrings (PSF License 2.0) |
| wb_pasttense  | short generation | 123       | English irregular verbs and their simple past, written for the workbench (MIT) |

A task file of your own is a `.jsonl` file of one kind, told by its fields:
multiple choice `{"question": str, "choices": [str, ...], "answer": index}`, cloze
`{"context": str, "target": str}` (accuracy: the target is the greedy continuation),
generation `{"prompt": str, "answer": str}` (exact match). Standard lm-eval tasks
(hellaswag, arc_easy, ...) are passed by name and download their data from the Hub.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from .._text import jsonl_items
from ..errors import WorkbenchError

DATA = Path(__file__).resolve().parent / "data"
LOCAL = {"wb_capitals": "capitals", "wb_docstrings": "docstrings", "wb_pasttense": "pasttense"}
_FIELDS = {"multiple_choice": ("question", "choices", "answer"),
           "cloze": ("context", "target"), "generation": ("prompt", "answer")}


def kind_of(doc: dict[str, Any]) -> str | None:
    for kind, fields in _FIELDS.items():
        if all(f in doc for f in fields):
            return kind
    return None


def read_docs(path: str | Path, kind: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """The documents of a task file, each checked, and the file's kind. A malformed one
    is refused with its line number and what is wrong."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise WorkbenchError(f"the task file {path} cannot be read ({e})",
                             "Give a UTF-8 .jsonl file, one JSON document per line.") from None
    docs = []
    for where, doc in jsonl_items(text, path.name):
        if not isinstance(doc, dict):
            raise WorkbenchError(f"{where} is a JSON {type(doc).__name__}, not an object",
                                 "Each line of a task file is one JSON object.")
        kind = kind or kind_of(doc)
        if kind is None:
            raise WorkbenchError(f"{where} has fields {sorted(doc)}, none of the task kinds",
                                 "Multiple choice: question, choices, answer; cloze: context, "
                                 "target; generation: prompt, answer.")
        _check(doc, kind, where)
        docs.append(doc)
    if not docs:
        raise WorkbenchError(f"the task file {path} holds no documents",
                             "Write one JSON object per line.")
    return docs, kind or ""


def _check(doc: dict[str, Any], kind: str, where: str) -> None:
    missing = [f for f in _FIELDS[kind] if f not in doc]
    if missing:
        raise WorkbenchError(f"{where} lacks {', '.join(missing)} (a {kind.replace('_', ' ')} "
                             "task's documents all have them)",
                             "Give every document the same fields.")
    text = {"multiple_choice": "question", "cloze": "context", "generation": "prompt"}[kind]
    if not isinstance(doc[text], str):
        raise WorkbenchError(f"{where}: {text} must be text", "Write it as a JSON string.")
    if kind == "multiple_choice":
        choices, answer = doc["choices"], doc["answer"]
        if not isinstance(choices, list) or not choices:
            raise WorkbenchError(f"{where} has an empty choice list" if choices == [] else
                                 f"{where}: choices must be a list of texts",
                                 "Give at least two choices, as a JSON list of strings.")
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise WorkbenchError(f"{where}: choices must be two or more non-empty texts",
                                 "Give at least two choices, as a JSON list of strings.")
        if isinstance(answer, bool) or not isinstance(answer, int) \
                or not 0 <= answer < len(choices):
            raise WorkbenchError(f"{where}: answer {answer!r} is not the index of a choice "
                                 f"(0..{len(choices) - 1})", "answer counts from 0.")
    else:
        target = "target" if kind == "cloze" else "answer"
        if not isinstance(doc[target], str) or not doc[target].strip():
            raise WorkbenchError(f"{where}: {target} must be non-empty text",
                                 "Write it as a JSON string.")


def _dataset(path: str, kind: str, **_lm_eval_metadata: Any) -> Any:
    """lm-eval's `custom_dataset`: the file as a DatasetDict with one split, test."""
    import datasets

    docs, _ = read_docs(path, kind)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def config(name: str, path: str | Path, kind: str) -> dict[str, Any]:
    """An lm-eval task configuration (a dict `simple_evaluate` takes) for a task file."""
    base: dict[str, Any] = {
        "task": name, "custom_dataset": functools.partial(_dataset, str(path), kind),
        "test_split": "test", "metadata": {"version": 1.0, "source": str(path)}}
    mean = {"aggregation": "mean", "higher_is_better": True}
    if kind == "multiple_choice":
        return {**base, "output_type": "multiple_choice",
                "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{answer}}",
                "metric_list": [{"metric": "acc", **mean}, {"metric": "acc_norm", **mean}]}
    if kind == "cloze":
        return {**base, "output_type": "loglikelihood", "doc_to_text": "{{context}}",
                "doc_to_target": " {{target}}",
                "metric_list": [{"metric": "acc", **mean},
                                {"metric": "perplexity", "aggregation": "perplexity",
                                 "higher_is_better": False}]}
    return {**base, "output_type": "generate_until", "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\"", "\n"], "max_gen_toks": 16,
                                  "do_sample": False},
            "metric_list": [{"metric": "exact_match", **mean, "ignore_case": True,
                             "ignore_punctuation": True}],
            "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                         {"function": "take_first"}]}]}


def local_task(name: str) -> dict[str, Any]:
    """A shipped task's configuration, for `lm_eval.simple_evaluate(tasks=[...])`."""
    if name not in LOCAL:
        raise WorkbenchError(f"{name!r} is not one of the workbench's local tasks",
                             "Local tasks: " + ", ".join(LOCAL) + ".")
    path = DATA / f"{LOCAL[name]}.jsonl"
    return config(name, path, read_docs(path)[1])


def resolve(tasks: str | list[str] | tuple[str, ...]) -> tuple[list[Any], Any]:
    """lm-eval task specs for names, task files and standard task names, with the
    TaskManager that knows them. An unknown name is refused before any work."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [t for t in names if t]
    if not names:
        raise WorkbenchError("no task given", "Name one or more, e.g. --tasks wb_capitals "
                             "(local: " + ", ".join(LOCAL) + ").")
    specs: list[Any] = []
    standard = []
    for t in names:
        if t in LOCAL:
            specs.append(local_task(t))
        elif t.endswith((".jsonl", ".json")):
            p = Path(t).expanduser()
            if not p.is_file():
                raise WorkbenchError(f"the task file {t} does not exist", "Check the path.")
            specs.append(config(p.stem, p, read_docs(p)[1]))
        elif t.endswith((".yaml", ".yml")):
            if not Path(t).expanduser().is_file():
                raise WorkbenchError(f"the task file {t} does not exist", "Check the path.")
            specs.append(str(Path(t).expanduser()))
        else:
            standard.append(t)
            specs.append(t)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=bool(standard))
    unknown = [t for t in standard if t not in manager.all_tasks]
    if unknown:
        raise WorkbenchError(f"unknown task {unknown[0]!r}",
                             "Local tasks (no network): " + ", ".join(LOCAL) + "; a .jsonl "
                             "task file; or a task of lm-eval's (`lm_eval ls tasks`).")
    return specs, manager
