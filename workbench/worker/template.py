"""Chat templates from GGUF files, rendered in a Jinja sandbox.

A GGUF file's template is untrusted code. The immutable sandbox refuses attribute
access to internals (`__class__`, `__globals__`, ...) and mutation of inputs, so a
template that tries to reach Python's object graph fails instead of running.
"""

from __future__ import annotations

import datetime
import functools
import json

from .._tools import Tools, with_system
from ..errors import GenerationError


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise GenerationError(f"the chat template refused the messages: {message}",
                              "Check the roles: many templates need user/assistant turns "
                              "to alternate.")

    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(source: str, messages: list[dict[str, str]], bos: str, eos: str,
                model_name: str, generation: bool = True, tools: str = "") -> str:
    """Render `messages` with a model's template, ending with the assistant's turn
    (`generation`) or with the last message (to train on a whole conversation).
    `tools` (OpenAI's tools list, JSON text) go to a template that takes them, and are
    described in the system message for one that does not."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    extra = {}
    if tools and "tools" in source:  # the model's own format for declaring functions
        extra["tools"] = json.loads(tools)
    elif tools:
        text = Tools.from_openai(json.loads(tools)).system_text()
        messages = [{"role": r, "content": c} for r, c in
                    with_system([(m["role"], m["content"]) for m in messages], text)]
    try:
        return _compile(source).render(messages=messages, add_generation_prompt=generation,
                                       bos_token=bos, eos_token=eos, **extra)
    except SecurityError as e:
        raise GenerationError(
            f"the chat template in {model_name} tried an unsafe operation and was refused: {e}",
            "The template in this GGUF file is not trustworthy. Use %%generate with a raw "
            "prompt, or get the model from a source you trust.") from None
    except TemplateError as e:
        raise GenerationError(f"the chat template in {model_name} failed to render: {e}",
                              "Use %%generate with a raw prompt instead.") from None
