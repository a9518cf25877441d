"""Sampling beyond the chain's own samplers: a request's JSON schema as llama.cpp's
grammar sampler, and the log-probabilities of the tokens sampled.

The schema was checked on the kernel side (`workbench/_schema.py`), so every keyword in
it is one the grammar enforces; here llama-cpp-python's converter writes the GBNF, and
the grammar sampler goes first in the chain, so no token outside the grammar is ever
sampled, whatever the temperature.
"""

from __future__ import annotations

import functools
from typing import Callable

import llama_cpp as L
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from ..engine.protocol import TokenLogprob
from ..errors import GenerationError


@functools.lru_cache(maxsize=32)
def gbnf(json_schema: str) -> str:
    """The GBNF grammar of a (checked) JSON schema, cached: a client repeats its schema."""
    try:
        return json_schema_to_gbnf(json_schema)
    except Exception as e:  # the converter asserts on what it cannot compile
        raise GenerationError(f"the JSON schema could not be compiled into a grammar: {e}",
                              "Simplify the schema (a `pattern` is the usual cause).") \
            from None


def grammar_sampler(vocab, json_schema: str):
    """llama.cpp's grammar sampler for `json_schema` (JSON text)."""
    grammar = gbnf(json_schema)
    sampler = L.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise GenerationError("llama.cpp refused the grammar compiled from the JSON schema",
                              "Simplify the schema (a `pattern` is the usual cause).")
    return sampler


def token_logprobs(ctx, i: int, token: int, n_vocab: int, n_top: int,
                   piece: Callable[[int], bytes]) -> TokenLogprob:
    """The log-probability of `token` at output `i` of the last decode, from the model's
    logits (before any sampler), with the `n_top` most likely tokens."""
    ptr = L.llama_get_logits_ith(ctx, i)
    if not ptr:
        raise GenerationError("llama.cpp kept no logits for this token, so there are no "
                              "log-probabilities", "Load the model with backend sampling off.")
    logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)
    top = logits.max()
    lp = logits - (top + np.log(np.exp(logits - top).sum()))
    best = np.argpartition(-lp, n_top)[:n_top] if n_top else np.array([], dtype=int)
    best = best[np.argsort(-lp[best])]
    return TokenLogprob(token=piece(token), logprob=float(lp[token]),
                        top=tuple((piece(int(t)), float(lp[t])) for t in best))


def recording(sample: Callable, n_vocab: int, n_top: int, piece: Callable[[int], bytes],
              out: list[TokenLogprob]) -> Callable:
    """`sample` (chain, ctx, i) -> token, also appending each token's logprobs to `out`."""
    def sample_and_record(chain, ctx, i):  # noqa: ANN001 - as llama_sampler_sample
        tok = sample(chain, ctx, i)
        out.append(token_logprobs(ctx, i, tok, n_vocab, n_top, piece))
        return tok
    return sample_and_record
