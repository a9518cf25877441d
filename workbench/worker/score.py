"""Exact log-likelihoods for evaluation (lm-evaluation-harness and `workbench.score`).

A scoring request is a list of (context, continuation) pairs. Each continuation's
log-likelihood is the sum, over its tokens, of the model's log-probability of that
token after everything before it, read from the logits in float64; "greedy" says
whether every token was the model's most likely one.

The scorer has a context of its own beside the runtime's generation context, with one
KV cache shared by many sequences (`kv_unified`). The pairs of a request are sorted by
their tokens and laid out as a prefix tree: a token several pairs share at the same
place (a multiple-choice question, asked once for all its choices; the opening words
many questions share) is decoded once, tagged with the sequence id of every pair through
it, so no choice recomputes its question. A fill of the cache holds up to 256 pairs and
n_batch tokens (a whole long pair where one is longer), so attention spans only the
cells of the pairs decoded together.

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
from .npbatch import NumpyBatch

_MAX_SEQ = 256  # pairs per cache fill: the choices of many questions


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
        self._nb = NumpyBatch(self.n_batch, self.n_seq)
        self._tok, self._pos, self._nseq = self._nb.tok, self._nb.pos, self._nb.nseq
        self._seq, self._out, self._batch = self._nb.seq, self._nb.out, self._nb.batch

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
        the argmax; with the tokens decoded and the seconds it took.

        The items are sorted by their tokens and laid out as a prefix tree: a token that
        several items share at the same place (the question of a multiple-choice item,
        the opening words of many questions) is decoded once, tagged with each of their
        sequence ids, and its logits row serves every item that needs it."""
        L.llama_set_n_threads(self.ctx, threads, threads)
        t0 = time.perf_counter()
        logps: list[list[float]] = [[] for _ in items]
        greedy = [True] * len(items)
        mem = L.llama_get_memory(self.ctx)
        order = sorted(range(len(items)), key=lambda j: items[j].context + items[j].continuation)
        decoded = 0
        fill: list[int] = []       # the items of the cache fill being planned
        cells = 0                  # the tree's nodes in it
        prev: list[int] = []       # the last item's tokens, for the shared prefix

        def run_fill() -> None:
            nonlocal decoded
            L.llama_memory_clear(mem, True)
            decoded += self._decode_tree(fill, items, logps, greedy, cancelled)

        for j in order:
            toks = items[j].context + items[j].continuation[:-1]
            shared = 0
            while shared < min(len(toks), len(prev)) and toks[shared] == prev[shared]:
                shared += 1
            limit = self.n_batch if len(toks) <= self.n_batch else self.n_ctx
            if fill and (len(fill) == self.n_seq or cells + len(toks) - shared > limit):
                run_fill()  # a full fill: attention spans only the cells of its own fill
                fill, cells, shared = [], 0, 0
            fill.append(j)
            cells += len(toks) - shared
            prev = toks
        if fill:
            run_fill()
        return logps, greedy, decoded, time.perf_counter() - t0

    def _decode_tree(self, fill: list[int], items: list[Item], logps: list[list[float]],
                     greedy: list[bool], cancelled: Callable[[], bool]) -> int:
        """Decode the prefix tree of `fill` (items sorted by their tokens), each node once
        with the sequence ids of the items through it; read the logits rows they need."""
        nodes: dict[tuple[int, int], int] = {}   # (parent node, token) -> node index
        node_tok: list[int] = []
        node_pos: list[int] = []
        node_seqs: list[list[int]] = []
        wants: dict[int, list[tuple[int, int]]] = {}  # node -> (item, continuation index)
        for s, j in enumerate(fill):
            it = items[j]
            toks = it.context + it.continuation[:-1]
            first = len(it.context) - 1  # this position's logits predict continuation[0]
            node = -1
            for p, tok in enumerate(toks):
                parent = node
                node = nodes.get((parent, tok), -1)
                if node < 0:
                    node = nodes[(parent, tok)] = len(node_tok)
                    node_tok.append(tok)
                    node_pos.append(p)
                    node_seqs.append([])
                node_seqs[node].append(s)
                if p >= first:
                    wants.setdefault(node, []).append((j, p - first))
        n = 0
        rows_of: list[int] = []  # the node of each output row of the batch, in order
        for i in range(len(node_tok) + 1):
            if i == len(node_tok) or n == self.n_batch:
                if cancelled():
                    raise GenerationError("the scoring was cancelled", "Run it again.")
                self._batch.n_tokens = n
                self.rt.log.clear()
                rc = L.llama_decode(self.ctx, self._batch)
                if rc != 0:
                    raise GenerationError(f"llama_decode failed while scoring (code {rc}): "
                                          f"{self.rt.log.last_error() or 'no reason given'}",
                                          "Reload the model and try again.")
                if rows_of:
                    rows = np.ctypeslib.as_array(L.llama_get_logits(self.ctx),
                                                 shape=(len(rows_of), self.n_vocab))
                    self._read(rows, [w for node in rows_of for w in [wants[node]]],
                               items, logps, greedy)
                self._out[:n] = 0
                rows_of, n = [], 0
                if i == len(node_tok):
                    break
            seqs = node_seqs[i]
            self._tok[n], self._pos[n], self._nseq[n] = node_tok[i], node_pos[i], len(seqs)
            self._seq[n, :len(seqs)] = seqs
            if i in wants:
                self._out[n] = 1
                rows_of.append(i)
            n += 1
        return len(node_tok)

    def _read(self, rows: Any, wants: list[list[tuple[int, int]]], items: list[Item],
              logps: list[list[float]], greedy: list[bool]) -> None:
        """Log-probabilities of the wanted tokens, from this batch's logits rows: row r
        serves each (item, continuation index) in wants[r]."""
        top = rows.argmax(axis=1)
        mx = rows[np.arange(len(rows)), top].astype(np.float64)
        lse = np.empty(len(rows))
        for a in range(0, len(rows), 64):  # float32 exponentials, summed in float64
            e = np.exp(rows[a:a + 64] - mx[a:a + 64, None].astype(np.float32))
            lse[a:a + 64] = mx[a:a + 64] + np.log(e.sum(axis=1, dtype=np.float64))
        for r, served in enumerate(wants):
            for j, k in served:
                tok = items[j].continuation[k]
                logps[j].append(float(rows[r, tok]) - float(lse[r]))
                greedy[j] &= bool(top[r] == tok)
