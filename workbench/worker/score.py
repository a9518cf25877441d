"""Exact log-likelihoods for evaluation (lm-evaluation-harness and `workbench.score`).

A scoring request is a list of (context, continuation) pairs. Each continuation's
log-likelihood is the sum, over its tokens, of the model's log-probability of that
token after everything before it, read from the logits in float64; "greedy" says
whether every token was the model's most likely one.

The scorer has a context of its own beside the runtime's generation context, with one
KV cache shared by many sequences (`kv_unified`): the pairs that share a context (the
choices of one multiple-choice question) are one group; the context's tokens are
decoded once, tagged with every choice's sequence id, and each choice's tokens follow
under its own id, so no choice recomputes the question. Groups are packed into batches
of up to n_batch tokens across questions, and the cache is cleared when it is full.

Tokenization follows lm-eval's Hugging Face model: the context's trailing spaces move
to the continuation, the pair is tokenized whole and the continuation is what follows
the context's own tokens; a context longer than the window loses its oldest tokens.
`rolling` scores a whole text in disjoint windows of the context size, each window
conditioned on the token before it (lm-eval's `loglikelihood_rolling`).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Any, Callable

import llama_cpp as L
import numpy as np

from ..errors import GenerationError, WorkbenchError

_MAX_SEQ = 64   # sequences per cache fill: the choices of several questions


@dataclass
class Item:
    context: list[int]
    continuation: list[int]
    index: int           # the pair's place in the request
    part: int = 0        # a rolling text's window


class Scorer:
    """A scoring context on the runtime's model. Free it before the model."""

    def __init__(self, rt: Any) -> None:
        from .params import context_params

        cfg = rt.config
        cp = context_params(cfg)
        cp.n_seq_max = min(_MAX_SEQ, L.llama_max_parallel_sequences())
        cp.kv_unified = True
        cp.n_batch = cp.n_ubatch = min(cfg.n_ctx, max(cfg.n_batch, 512))
        rt.log.clear()
        ctx = L.llama_init_from_model(rt.model, cp)
        if not ctx:
            raise GenerationError(f"llama.cpp could not create a scoring context of "
                                  f"{cfg.n_ctx:,} tokens: {rt.log.last_error() or 'no reason'}",
                                  "Reload the model with a smaller --n-ctx.")
        if cfg.lora:  # the adapter scores as it generates
            adapter = L.llama_adapter_lora_init(rt.model, str(cfg.lora).encode())
            arr = (L.llama_adapter_lora_p_ctypes * 1)(adapter)
            scale = (ctypes.c_float * 1)(cfg.lora_scale)
            if not adapter or L.llama_set_adapters_lora(ctx, arr, 1, scale) != 0:
                L.llama_free(ctx)
                raise GenerationError("llama.cpp could not apply the LoRA to the scoring "
                                      "context", "Reload the model and try again.")
        self.rt, self.ctx = rt, ctx
        self.n_ctx = L.llama_n_ctx(ctx)
        self.n_batch, self.n_seq = cp.n_batch, cp.n_seq_max
        self.n_vocab = L.llama_vocab_n_tokens(rt.vocab)
        bos = L.llama_vocab_bos(rt.vocab)
        self.prefix = bos if bos >= 0 else L.llama_vocab_eos(rt.vocab)
        n = self.n_batch
        self._tok = np.zeros(n, np.int32)
        self._pos = np.zeros(n, np.int32)
        self._nseq = np.ones(n, np.int32)
        self._seq = np.zeros((n, self.n_seq), np.int32)
        self._seqp = self._seq.ctypes.data + 4 * self.n_seq * np.arange(n, dtype=np.uint64)
        self._out = np.zeros(n, np.int8)
        b = L.llama_batch()
        b.token = self._tok.ctypes.data_as(ctypes.POINTER(L.llama_token))
        b.pos = self._pos.ctypes.data_as(ctypes.POINTER(L.llama_pos))
        b.n_seq_id = self._nseq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._seqp.ctypes.data,
                               ctypes.POINTER(ctypes.POINTER(L.llama_seq_id)))
        b.logits = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._batch = b

    def close(self) -> None:
        if self.ctx:
            L.llama_free(self.ctx)
        self.ctx = None

    # ---- requests -> items ----------------------------------------------

    def _tokens(self, x: str | tuple[int, ...], add_special: bool, where: str) -> list[int]:
        if isinstance(x, str):
            return self.rt.tokenize(x, add_special)
        return self.rt.check_tokens(tuple(x), where)

    def items(self, pairs: tuple[tuple[Any, Any], ...], rolling: bool) -> list[Item]:
        out: list[Item] = []
        for i, pair in enumerate(pairs):
            if rolling:
                toks = self._tokens(pair[0], False, f"text {i}")
                if not toks:
                    raise WorkbenchError(f"text {i} has no tokens",
                                         "Every text to score must hold some text.")
                w = self.n_ctx - 1  # predicted tokens per window
                for k, start in enumerate(range(0, len(toks), w)):
                    before = [toks[start - 1]] if start else [self.prefix]
                    out.append(Item(before, toks[start:start + w], i, k))
                continue
            context, continuation = pair
            if isinstance(context, str) and isinstance(continuation, str):
                n_spaces = len(context) - len(context.rstrip(" "))
                if n_spaces:
                    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
                whole = self.rt.tokenize(context + continuation, True)
                ctx_toks = self.rt.tokenize(context, True) if context else []
                cont = whole[len(ctx_toks):]
            else:
                ctx_toks = self._tokens(context, True, f"pair {i}'s context")
                cont = self._tokens(continuation, False, f"pair {i}'s continuation")
            if not cont:
                raise WorkbenchError(f"pair {i}'s continuation {continuation!r} has no tokens",
                                     "Each continuation must hold text to score.")
            if len(cont) >= self.n_ctx:
                raise WorkbenchError(
                    f"pair {i}'s continuation is {len(cont):,} tokens, longer than the "
                    f"context window ({self.n_ctx:,} tokens, one kept for what precedes it)",
                    "Reload the model with a larger --n-ctx, or score shorter continuations.")
            if not ctx_toks:
                ctx_toks = [self.prefix]
            keep = self.n_ctx - len(cont)  # the oldest context tokens go first
            out.append(Item(ctx_toks[-keep:], cont, i))
        return out

    # ---- scoring ----------------------------------------------------------

    def score(self, items: list[Item], threads: int,
              cancelled: Callable[[], bool]) -> tuple[list[list[float]], list[bool], int, float]:
        """Per item: the continuation's token log-probabilities and whether each token was
        the argmax; with the tokens decoded and the seconds it took."""
        L.llama_set_n_threads(self.ctx, threads, threads)
        t0 = time.perf_counter()
        logps: list[list[float]] = [[] for _ in items]
        greedy = [True] * len(items)
        groups: list[list[int]] = []  # items of one context, consecutive
        room = 0  # cells left in the last group's fill of the cache
        for j, it in enumerate(items):
            if groups and items[groups[-1][0]].context == it.context \
                    and len(groups[-1]) < self.n_seq and len(it.continuation) <= room:
                groups[-1].append(j)
            else:
                groups.append([j])
                room = self.n_ctx - len(it.context)
            room -= len(it.continuation)
        mem = L.llama_get_memory(self.ctx)
        L.llama_memory_clear(mem, True)
        cells = seq = n = decoded = 0
        # per output row, in order: (item, token index), or (-1, group) for a context's
        # last position, which predicts the first token of each of the group's continuations
        wants: list[tuple[int, int]] = []

        def flush() -> None:
            nonlocal n, decoded
            if not n:
                return
            if cancelled():
                raise GenerationError("the scoring was cancelled", "Run it again.")
            self._batch.n_tokens = n
            self.rt.log.clear()
            rc = L.llama_decode(self.ctx, self._batch)
            if rc != 0:
                raise GenerationError(f"llama_decode failed while scoring (code {rc}): "
                                      f"{self.rt.log.last_error() or 'no reason given'}",
                                      "Reload the model and try again.")
            decoded += n
            if wants:
                rows = np.ctypeslib.as_array(L.llama_get_logits(self.ctx),
                                             shape=(len(wants), self.n_vocab))
                self._read(rows, wants, items, groups, logps, greedy)
            wants.clear()
            self._out[:n] = 0
            n = 0

        def put(tok: int, pos: int, seqs: list[int], want: tuple[int, int] | None) -> None:
            nonlocal n
            self._tok[n], self._pos[n], self._nseq[n] = tok, pos, len(seqs)
            self._seq[n, :len(seqs)] = seqs
            if want is not None:
                self._out[n] = 1
                wants.append(want)
            n += 1
            if n == self.n_batch:
                flush()

        for gi, g in enumerate(groups):
            ctx_toks = items[g[0]].context
            need = len(ctx_toks) + sum(len(items[j].continuation) for j in g)
            if cells + need > self.n_ctx or seq + len(g) > self.n_seq:
                flush()
                L.llama_memory_clear(mem, True)
                cells = seq = 0
            ids = list(range(seq, seq + len(g)))
            last = len(ctx_toks) - 1
            for p, tok in enumerate(ctx_toks):  # the shared context: once, every id
                put(tok, p, ids, (-1, gi) if p == last else None)
            for s, j in zip(ids, g):
                cont = items[j].continuation
                for k, tok in enumerate(cont[:-1]):
                    put(tok, len(ctx_toks) + k, [s], (j, k + 1))
            cells += need
            seq += len(g)
        flush()
        return logps, greedy, decoded, time.perf_counter() - t0

    def _read(self, rows: Any, wants: list[tuple[int, int]], items: list[Item],
              groups: list[list[int]], logps: list[list[float]], greedy: list[bool]) -> None:
        """Log-probabilities of the wanted tokens, from this batch's logits rows."""
        top = rows.argmax(axis=1)
        mx = rows[np.arange(len(rows)), top].astype(np.float64)
        lse = np.empty(len(rows))
        for a in range(0, len(rows), 64):  # float32 exponentials, summed in float64
            e = np.exp(rows[a:a + 64] - mx[a:a + 64, None].astype(np.float32))
            lse[a:a + 64] = mx[a:a + 64] + np.log(e.sum(axis=1, dtype=np.float64))
        for r, (j, k) in enumerate(wants):
            for jj, kk in ([(j2, 0) for j2 in groups[k]] if j < 0 else [(j, k)]):
                tok = items[jj].continuation[kk]
                logps[jj].append(float(rows[r, tok]) - float(lse[r]))
                greedy[jj] &= bool(top[r] == tok)
