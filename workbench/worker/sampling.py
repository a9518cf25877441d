"""Grammar-constrained sampling: a request's JSON schema as llama.cpp's grammar sampler.

The schema was checked on the kernel side (`workbench/_schema.py`), so every keyword in
it is one the grammar enforces; here llama-cpp-python's converter writes the GBNF, and
the grammar sampler goes first in the chain, so no token outside the grammar is ever
sampled, whatever the temperature.
"""

from __future__ import annotations

import functools

import llama_cpp as L
from llama_cpp.llama_grammar import json_schema_to_gbnf

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
