"""What one request's decoding produced, handed from the decode loops to the worker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunResult:
    text: str
    prompt_tokens: int
    prompt_seconds: float
    t_received: float
    t_first: float
    t_last: float
    generated: int
    finish_reason: str
    cached_tokens: int = 0
    cache_tier: str = ""
    logprobs: tuple = ()  # TokenLogprob of each generated token, when asked for
    draft_tokens: int = 0     # tokens drafted and checked (speculative decoding)
    accepted_tokens: int = 0  # of which the target kept
    speculative: str = ""     # the draft sources the request used ("" when none)
