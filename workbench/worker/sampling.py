"""Sampling beyond the chain's own samplers: a request's JSON schema as llama.cpp's
grammar sampler, and the log-probabilities of the tokens sampled.

The schema was checked on the kernel side (`workbench/_schema.py`), so every keyword in
it is one the grammar enforces; here llama-cpp-python's converter writes the GBNF, and
the grammar sampler goes first in the chain, so no token outside the grammar is ever
sampled, whatever the temperature.
"""

from __future__ import annotations

import ctypes
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
        grammar = json_schema_to_gbnf(json_schema)
    except Exception as e:  # the converter asserts on what it cannot compile
        raise GenerationError(f"the JSON schema could not be compiled into a grammar: {e}",
                              "Simplify the schema (a `pattern` is the usual cause).") \
            from None
    # JSON strings may not hold raw control characters; this converter's `char` lets
    # them through (llama.cpp's own converter excludes them), and json.loads refuses them.
    return grammar.replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x7F\\x00-\\x1F]')


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


class Guided:
    """Sampling under a grammar without paying for it on every token, as llama.cpp's own
    common sampler does: the chain picks from the model's logits as if free; only when
    the grammar rejects that pick are all candidates filtered by the grammar and the
    chain run again. Most tokens of a JSON answer are picked right the first time, and
    checking one token is cheap where filtering the whole vocabulary is not.

    `sample(chain, ctx, i)` has the signature of `llama_sampler_sample` (the chain must
    not hold the grammar); `free()` releases the grammar."""

    def __init__(self, vocab, json_schema: str, n_vocab: int) -> None:
        self.grammar = grammar_sampler(vocab, json_schema)
        self.n_vocab = n_vocab
        dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        self._data = np.zeros(n_vocab, dtype=dtype)
        self._data["id"] = np.arange(n_vocab, dtype=np.int32)
        self._ptr = self._data.ctypes.data_as(L.llama_token_data_p)
        self._one = (L.llama_token_data * 1)()
        self._one_arr = L.llama_token_data_array(self._one, 1, -1, False)

    def _pick(self, chain, logits, grammar_first: bool) -> int:
        self._data["logit"] = logits
        self._data["p"] = 0.0
        arr = L.llama_token_data_array(self._ptr, self.n_vocab, -1, False)
        if grammar_first:
            L.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        L.llama_sampler_apply(chain, ctypes.byref(arr))
        if arr.selected < 0:
            raise GenerationError("the sampler chain selected no token",
                                  "Loosen top_p / min_p, or drop the logit_bias.")
        return arr.data[arr.selected].id

    def _allowed(self, tok: int) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = tok, 1.0, 0.0
        self._one_arr.size, self._one_arr.selected = 1, -1
        L.llama_sampler_apply(self.grammar, ctypes.byref(self._one_arr))
        return self._one[0].logit != float("-inf")

    def sample(self, chain, ctx, i: int) -> int:
        ptr = L.llama_get_logits_ith(ctx, i)
        if not ptr:
            raise GenerationError("llama.cpp kept no logits for this token",
                                  "Load the model with backend sampling off.")
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        tok = self._pick(chain, logits, False)
        if not self._allowed(tok):
            tok = self._pick(chain, logits, True)
        L.llama_sampler_accept(self.grammar, tok)
        L.llama_sampler_accept(chain, tok)
        return tok

    def free(self) -> None:
        if self.grammar:
            L.llama_sampler_free(self.grammar)
            self.grammar = None
