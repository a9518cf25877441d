"""POST /v1/embeddings, as OpenAI's: parse the request, embed, answer.

    {"model": "...", "input": "text" | ["text", ...] | [token, ...] | [[token, ...], ...],
     "encoding_format": "float" | "base64", "dimensions": (refused), "user": "..."}

The service's embedder is a second engine (a worker of its own, see
`protocol.LoadEmbedder`), named by service.json's "embedding" section; the chat
model's engine never embeds. A request naming the chat model is a 400 that says why
it cannot embed; so is an empty input, and more than `MAX_INPUTS` inputs.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from typing import Any

from .._text import check_text
from ..errors import WorkbenchError
from ..models.embedding import MAX_INPUTS, check_inputs, pooling
from .request import ApiError

_FIELDS = {"model", "input", "encoding_format", "user", "dimensions"}


@dataclasses.dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str | tuple[int, ...], ...]
    base64: bool


def _inputs(raw: Any) -> tuple[str | tuple[int, ...], ...]:
    def tokens(x: list, where: str) -> tuple[int, ...]:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            raise ApiError(400, f"{where} must be a string, a list of strings, or a list of "
                           "token ids (integers)", param="input")
        return tuple(x)

    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        items = [tokens(raw, "input")]  # one token array
    elif isinstance(raw, list):
        items = []
        for i, x in enumerate(raw[:MAX_INPUTS + 1]):
            if isinstance(x, str):
                items.append(x)
            elif isinstance(x, list):
                items.append(tokens(x, f"input[{i}]"))
            else:
                raise ApiError(400, f"input[{i}] must be a string or a list of token ids",
                               param="input")
        if len(raw) > MAX_INPUTS:
            items = list(raw)  # check_inputs names the count
    else:
        raise ApiError(400, "'input' must be a string, a list of strings, or token ids",
                       param="input")
    try:
        check_inputs(items)
        for i, x in enumerate(items):
            if isinstance(x, str):
                check_text(x, f"input[{i}]")
    except WorkbenchError as e:
        raise ApiError(400, f"{e.message} ({e.hint})" if e.hint else e.message,
                       param="input") from None
    return tuple(items)


def parse(body: Any) -> EmbeddingRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise ApiError(400, f"unsupported field '{unknown[0][:80]}' for embeddings",
                       param=unknown[0][:80])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the embedding model's id", param="model")
    if "input" not in body:
        raise ApiError(400, "'input' is required", param="input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', not "
                       f"{str(fmt)[:40]!r}", param="encoding_format")
    if body.get("dimensions") is not None:
        raise ApiError(400, "'dimensions' is not supported: this model's embeddings have "
                       "one size", param="dimensions")
    return EmbeddingRequest(model, _inputs(body["input"]), fmt == "base64")


async def answer(body: Any, embedder: Any, embed_name: str | None, chat_engine: Any,
                 chat_names: tuple[str, ...]) -> dict:
    """The response to an embeddings request, or an ApiError (4xx/5xx) naming why not."""
    req = parse(body)
    if embed_name is None or req.model != embed_name:
        if req.model in chat_names:
            why = "it is not an embedding model"
            model = chat_engine.model
            if model is not None:
                try:
                    pooling(model.path)
                except WorkbenchError as e:
                    why = e.message
            also = f"; this service embeds with '{embed_name}'" if embed_name else \
                "; this service has no embedding model (add one under \"embedding\" in " \
                "service.json)"
            raise ApiError(400, f"the model '{req.model[:80]}' cannot embed: {why}{also}",
                           param="model", code="model_not_embedding")
        raise ApiError(404, f"the model '{req.model[:80]}' does not exist"
                       + (f"; this service embeds with '{embed_name}'" if embed_name else ""),
                       param="model", code="model_not_found")
    # a WorkbenchError from the engine (a text too long, a crash) is the app's to map
    r = await asyncio.to_thread(embedder.embed, list(req.inputs))
    import numpy as np

    rows = np.frombuffer(r.data, np.float32).reshape(r.n, r.dim)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()
             if req.base64 else row.tolist()} for i, row in enumerate(rows)]
    return {"object": "list", "data": data, "model": embed_name,
            "usage": {"prompt_tokens": r.prompt_tokens, "total_tokens": r.prompt_tokens}}
