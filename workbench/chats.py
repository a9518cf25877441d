"""Chats that remember: a conversation's messages, sent whole with each new turn.

The worker's prefix cache (kvcache/) keeps the KV state of each request's prompt and
answer, and the template renders earlier turns the same way every time, so a follow-up
restores that state and computes only its new tokens (`metrics.cached_tokens`). For that
the assistant's turn is stored exactly as generated, never stripped or reformatted.

A saved chat is JSON: {"format": "workbench-chat", "version": 1, "name", "system",
"settings" (GenerationConfig fields), "messages": [{"role", "content"}, ...]}.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import GenerationConfig, build
from .errors import WorkbenchError

if TYPE_CHECKING:
    from .engine.stream import TokenStream
    from .results import Completion
    from .session import Session

FORMAT, VERSION = "workbench-chat", 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ROLES = ("user", "assistant")


def check_name(name: str) -> str:
    """A chat's name: letters, digits, '.', '_' and '-', no path characters."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise WorkbenchError(f"invalid chat name {name!r}",
                             "Use up to 64 letters, digits, '.', '_' and '-' (no '/', "
                             "no '..', no spaces).")
    return name


class Chat:
    """A conversation with the loaded model that keeps its history. `send(text)` (or
    calling it) answers with every earlier turn as context; `history` holds the
    messages; `reset()` forgets them; `save(path)` / `Chat.load(path)` keep them as JSON.
    `settings`: GenerationConfig fields used for every turn (a send may override them)."""

    def __init__(self, system: str | None = None, name: str | None = None, *,
                 session: Session | None = None, **settings: Any) -> None:
        build(GenerationConfig, dict(settings))  # refuse a bad setting now, not at the send
        self.name = check_name(name) if name is not None else None
        self.system = system
        self.settings = settings
        self._session = session
        self._turns: list[tuple[str, str]] = []  # (role, content), user/assistant alternating
        self._pending: tuple[str, TokenStream] | None = None
        self.last: Completion | None = None

    def session(self) -> Session:
        if self._session is None:
            raise WorkbenchError("this chat has no session",
                                 "Use workbench.Chat(...), or pass session=.")
        return self._session

    # ---- the conversation ------------------------------------------------------------

    @property
    def history(self) -> list[dict[str, str]]:
        """The messages so far, the system prompt first: [{role, content}, ...]."""
        self._settle()
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": r, "content": c} for r, c in self._turns]

    def send(self, text: str, *, stream: bool = False,
             **settings: Any) -> Completion | TokenStream:
        """Answer `text` with the history as context, and remember both. With
        `stream=True`, a TokenStream; the answer joins the history once it ends (an
        interrupted one keeps the text it had)."""
        from .results import Completion

        if not isinstance(text, str) or not text.strip():
            raise WorkbenchError("nothing to send", "Give the chat some text.")
        self._settle()
        msgs = [(m["role"], m["content"]) for m in self.history] + [("user", text)]
        s = self.session().chat(msgs, stream=True, **{**self.settings, **settings})
        self._pending = (text, s)
        if stream:
            return s
        self._settle()
        self.last = Completion(s.text, s.metrics)
        return self.last

    __call__ = send

    def _settle(self) -> None:
        """Add a finished (or interrupted) streamed answer to the history."""
        if self._pending is None:
            return
        text, s = self._pending
        self._pending = None
        s.result()  # the rest of it; a failed request raises here and adds nothing
        if s.text:
            self._turns += [("user", text), ("assistant", s.text)]

    def reset(self) -> None:
        """Forget the turns (the system prompt and settings stay)."""
        if self._pending is not None:
            self._pending[1].cancel()
        self._pending, self._turns, self.last = None, [], None

    def __len__(self) -> int:
        """The number of exchanges (a question and its answer)."""
        self._settle()
        return len(self._turns) // 2

    # ---- files -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the chat as JSON to `path`; returns the path."""
        p = Path(path).expanduser()
        data = {"format": FORMAT, "version": VERSION, "name": self.name, "system": self.system,
                "settings": self.settings, "messages": self.history}
        try:
            p.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        except (OSError, TypeError, ValueError) as e:
            raise WorkbenchError(f"cannot save the chat to {p}: {e}",
                                 "Give a path in a folder you can write to.") from None
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: Any) -> Chat:
        """A chat saved with `save`, ready to continue."""
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WorkbenchError(f"cannot read a chat from {p}: {e}",
                                 "Give a file written by Chat.save or %chat_history "
                                 "--save.") from None
        system, name, settings, turns = _parse(data, p)
        chat = cls(system=system, name=name, **kwargs, **settings)
        chat._turns = turns
        return chat

    # ---- display -----------------------------------------------------------------------

    def _label(self) -> str:
        return f"chat {self.name!r}" if self.name else "chat"

    def __repr__(self) -> str:
        lines = [f"{self._label()}: {len(self)} exchange(s)"]
        for m in self.history:
            lines.append(f"[{m['role']}] {m['content']}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td style='text-align:left;vertical-align:top'><b>{m['role']}</b></td>"
            f"<td style='text-align:left;white-space:pre-wrap'>{html.escape(m['content'])}"
            "</td></tr>" for m in self.history)
        return (f"<div><b>{html.escape(self._label())}</b>: {len(self)} exchange(s)</div>"
                f"<table><tr><th>role</th><th>content</th></tr>{rows}</table>")


def _parse(data: Any, p: Path) -> tuple[str | None, str | None, dict[str, Any],
                                        list[tuple[str, str]]]:
    def bad(why: str) -> WorkbenchError:
        return WorkbenchError(f"{p} is not a saved chat: {why}",
                              "Give a file written by Chat.save or %chat_history --save.")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"no \"format\": \"{FORMAT}\"")
    if data.get("version") != VERSION:
        raise bad(f"version {data.get('version')!r}, this workbench reads {VERSION}")
    system, name, settings = data.get("system"), data.get("name"), data.get("settings") or {}
    if system is not None and not isinstance(system, str):
        raise bad("\"system\" is not text")
    if name is not None:
        check_name(name)
    if not isinstance(settings, dict):
        raise bad("\"settings\" is not an object")
    if isinstance(settings.get("logit_bias"), list):  # JSON made its pairs lists
        settings["logit_bias"] = [tuple(x) for x in settings["logit_bias"]]
    msgs = data.get("messages")
    if not isinstance(msgs, list):
        raise bad("no \"messages\" list")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
            raise bad(f"message {i} is not {{role, content}}")
        if m.get("role") == "system" and i == 0:
            system = m["content"]
            continue
        if m.get("role") != _ROLES[len(turns) % 2]:
            raise bad(f"message {i} should have the role {_ROLES[len(turns) % 2]!r}")
        turns.append((m["role"], m["content"]))
    if len(turns) % 2:
        raise bad("the last question has no answer")
    try:
        build(GenerationConfig, dict(settings))
    except WorkbenchError as e:
        raise bad(e.message) from None
    return system, name, settings, turns


class Chats:
    """This kernel's named chats (`%%chat --session NAME`)."""

    def __init__(self) -> None:
        self._chats: dict[str, Chat] = {}

    def get(self, name: str) -> Chat:
        """The chat called `name`; an error naming the known ones if there is none."""
        check_name(name)
        if name not in self._chats:
            known = ", ".join(sorted(self._chats)) or "none yet"
            raise WorkbenchError(f"no chat session {name!r}",
                                 f"Start it with `%%chat --session {name}` (sessions: {known}).")
        return self._chats[name]

    def open(self, name: str, make: Any) -> Chat:
        """The chat called `name`, made with `make(name)` if it is new."""
        check_name(name)
        if name not in self._chats:
            self._chats[name] = make(name)
        return self._chats[name]

    def names(self) -> list[str]:
        return sorted(self._chats)
