"""The one error type users see.

A `WorkbenchError` carries a message and a hint. The magics show both without a
traceback; anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """A user-facing failure: what went wrong (`message`) and what to do (`hint`)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\nHint: {self.hint}" if self.hint else self.message

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing a traceback.
        lines = [f"WorkbenchError: {self.message}"]
        if self.hint:
            lines.append(f"Hint: {self.hint}")
        return lines


class ModelFileError(WorkbenchError):
    """The model file is missing, not GGUF, or damaged."""


class EngineCrashed(WorkbenchError):
    """The worker process died while it served a request."""


class GenerationError(WorkbenchError):
    """A request could not run: bad parameters, too long a prompt, no model."""


class PromptTooLong(GenerationError):
    """The prompt does not fit in the context (the service answers it as OpenAI's
    context_length_exceeded)."""


class BadText(WorkbenchError):
    """Text that is not valid Unicode: it holds a lone UTF-16 surrogate, which UTF-8
    cannot encode. `where` names the field, `position` the character (from 0)."""

    def __init__(self, message: str, hint: str, where: str, position: int) -> None:
        super().__init__(message, hint)
        self.where, self.position = where, position


class EngineFault(WorkbenchError):
    """The worker failed on one request (a bug, not a mistake in the request). The
    worker goes on serving; `details` keeps its traceback."""

    def __init__(self, message: str, hint: str = "", details: str = "") -> None:
        super().__init__(message, hint)
        self.details = details


def no_model() -> GenerationError:
    """The error for any request that needs a model when none is loaded."""
    return GenerationError("no model is loaded",
                           "Load one first with `%load_model` (no argument loads the default "
                           "model).")
