"""Agreement with a reference implementation: the same GGUF file loaded through
transformers (dequantized to float32) scores the same token ids, and the log-
probabilities are compared token by token.

The two differ by llama.cpp's arithmetic: quantized matrix products round their inputs
(activations) to 8 bits, the KV cache holds float16. What remains is a tolerance per
token, stated beside the numbers (`Agreement`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Agreement:
    """Per-token |ours - transformers'| log-probability differences (nats)."""
    tokens: int
    pairs: int
    max_abs_diff: float
    mean_abs_diff: float
    p99_abs_diff: float
    same_greedy: float   # share of pairs whose "greedy" verdict matches

    def __repr__(self) -> str:
        return (f"{self.pairs} pairs, {self.tokens} tokens: max |Δ log p| "
                f"{self.max_abs_diff:.4f}, mean {self.mean_abs_diff:.5f}, p99 "
                f"{self.p99_abs_diff:.4f} nats; greedy verdicts agree on "
                f"{self.same_greedy:.1%}")


def hf_tokens(path: str | os.PathLike, pairs: Sequence[tuple[str, str]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Token ids of (context, continuation) pairs by the GGUF's tokenizer as transformers
    builds it, split as lm-eval splits them. In a child process (it imports torch)."""
    from .. import _child

    return _child.run(_tokens_child, (str(path), [tuple(p) for p in pairs]),
                      "tokenizing with transformers")


def hf_logprobs(path: str | os.PathLike, token_pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                threads: int | None = None) -> list[tuple[list[float], bool]]:
    """Per continuation token log-probabilities (float64) and the greedy verdict, from
    transformers running the dequantized GGUF on the CPU. In a child process."""
    from .. import _child
    from .._cpu import idle_cores

    return _child.run(_logprobs_child, (str(path), [(list(a), list(b)) for a, b in token_pairs],
                                        threads or idle_cores().idle),
                      "scoring with transformers")


def agreement(engine: Any, path: str | os.PathLike, token_pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
              threads: int | None = None) -> Agreement:
    """Score `token_pairs` with the engine's loaded model (the file at `path`) and with
    transformers, and compare them token by token."""
    pairs = [(tuple(a), tuple(b)) for a, b in token_pairs]
    ours = engine.score(pairs)
    theirs = hf_logprobs(path, pairs, threads)
    diffs: list[float] = []
    same = 0
    for lp, greedy, (ref, ref_greedy) in zip(ours.logprobs, ours.greedy, theirs):
        diffs += [abs(a - b) for a, b in zip(lp, ref)]
        same += greedy == ref_greedy
    diffs.sort()
    return Agreement(len(diffs), len(pairs), diffs[-1], math.fsum(diffs) / len(diffs),
                     diffs[min(len(diffs) - 1, int(0.99 * len(diffs)))], same / len(pairs))


def _tokens_child(path: str, pairs: list[tuple[str, str]], report: Any) -> list[Any]:
    from ..models.hf import load_tokenizer

    tok = load_tokenizer(path)
    out = []
    for context, continuation in pairs:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        out.append((tuple(ctx), tuple(whole[len(ctx):])))
    return out


def _logprobs_child(path: str, pairs: list[tuple[list[int], list[int]]], threads: int,
                    report: Any) -> list[tuple[list[float], bool]]:
    import torch

    from ..models.hf import load_model

    torch.set_num_threads(max(1, threads))
    model = load_model(path, torch.float32)
    model.eval()
    out = []
    with torch.inference_mode():
        for k, (ctx, cont) in enumerate(pairs):
            ids = torch.tensor([ctx + cont])
            logits = model(ids).logits[0, len(ctx) - 1:-1].double()
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(cont)
            lp = logp[torch.arange(len(cont)), target]
            out.append((lp.tolist(), bool((logp.argmax(-1) == target).all())))
            report.progress((k + 1) / len(pairs), k + 1, len(pairs), "pairs")
    return out
