"""Continuous batching in the worker: several requests decode together, one
`llama_decode` per step.

Each request owns a sequence id of the context (the model is loaded with
`n_parallel` sequences), its own sampler chain and its own stop conditions. Requests
join and leave between steps. A step puts one token in the batch for every sequence
that is generating, then fills what room is left (up to `n_batch`) with prompt tokens
of sequences that joined, so a long prompt delays the others by one batch at most.
Each sequence may use `n_ctx / n_parallel` tokens of context.

With speculative decoding (worker/speculative.py), a generating sequence puts its drafts
after its token, each with logits; its sampler then checks them in order, and the cells
of drafts not kept are removed. Drafts are sized against the whole step's cost, so they
fill room that is nearly free and never push out another sequence's token.

With the prefix cache on, a joining request starts from the longest cached prefix of its
prompt (restored into its sequence), and a finished sequence's KV state is offered to the
cache after its reply has gone out, before its cells are freed.

This module is part of the runtime: it is the only other place that touches llama.cpp
objects, always through the runtime that owns them.
"""

from __future__ import annotations

import codecs
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import llama_cpp as L

from ..config import GenerationConfig
from ..errors import GenerationError, PromptTooLong
from .sampling import Guided, token_logprobs
from .speculative import STEP_LIMIT, Speculator

from .result import RunResult

if TYPE_CHECKING:
    from .runtime import Runtime


class Sequence:
    """One request in the batch: its prompt, its sampler chain, its text so far."""

    def __init__(self, rt: "Runtime", seq_id: int, request_id: str, tokens: list[int],
                 g: GenerationConfig, t_received: float,
                 emit: Callable[[str, int, int, float], None],
                 cancelled: Callable[[], bool],
                 drafts: Callable[[int, int], None] | None = None) -> None:
        self.rt, self.seq_id, self.request_id = rt, seq_id, request_id
        self.on_drafts = drafts  # told the drafted and accepted counts after each check
        self.tokens, self.g = tokens, g
        self.t_received = t_received
        self.emit, self.cancelled = emit, cancelled
        sources = rt.spec.sources(g.speculative) if rt.spec is not None else ()
        self.chain = rt._sampler(g)
        self.guided: Guided | None = None  # a JSON schema's grammar, checked per token
        if g.json_schema:
            try:
                self.guided = Guided(rt.vocab, g.json_schema, rt.info.n_vocab)
            except BaseException:
                L.llama_sampler_free(self.chain)
                raise
        self.spec = Speculator(rt.spec, sources, seq_id, tokens) if sources else None
        self.drafts: list[int] = []  # checked in this step, after next_token
        # On a GPU the chain runs inside the compute graph and only the token id comes
        # back; llama.cpp refuses chains it cannot run there, which sample on the host.
        # Drafts are checked on the host: each position's sample depends on the last.
        self.on_backend = bool(rt.backend_sampling and self.guided is None and
                               self.spec is None and
                               L.llama_set_sampler(rt.ctx, seq_id, self.chain))
        self.n_fed = 0            # tokens whose KV state the sequence holds
        self.next_token = -1      # sampled, fed in the next step
        self.sampled: list[int] = []  # generated tokens to feed, in order
        self.cached_tokens, self.cache_tier = 0, ""  # the prompt's prefix restored
        self.logit_index = -1     # where this sequence's logits are in the current batch
        self.n_gen = 0
        self.logprobs: list = []  # TokenLogprob of each sampled token, when asked for
        self.reason: str | None = None  # set when the sequence is done
        self.error: Exception | None = None  # with reason "error"
        self.trace = ""  # the traceback, where `error` is a bug
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._out: list[str] = []
        self._pending = ""        # text held back while it could still start a stop string
        self._hold = max((len(s) for s in g.stop), default=0)
        self.t_prefill = time.monotonic()
        self.t_first = self.t_last = 0.0
        self.prompt_seconds = 0.0

    @property
    def prefilling(self) -> bool:
        return self.n_fed < len(self.tokens)

    def accept(self, tok: int, n_ctx_seq: int) -> None:
        """Take the token sampled for this sequence: emit its text, or finish."""
        now = time.monotonic()
        if self.n_gen == 0:
            self.t_first = now
            self.prompt_seconds = now - self.t_prefill
        if not self.g.ignore_eos and L.llama_vocab_is_eog(self.rt.vocab, tok):
            self.reason = "stop"
            return
        text = self._utf8(self.rt._piece(tok))
        self.t_last = now
        if self.g.stop:
            self._pending += text
            cuts = [i for i in (self._pending.find(s) for s in self.g.stop) if i >= 0]
            if cuts:
                self._send(self._pending[:min(cuts)], tok, now)
                self._pending, self.reason = "", "stop_string"
                return
            keep = self._hold - 1
            text, self._pending = ((self._pending[:-keep], self._pending[-keep:]) if keep
                                   else (self._pending, ""))
        self._send(text, tok, now)
        if self.n_gen >= self.g.max_tokens:
            self.reason = "length"
        elif self.cancelled():
            self.reason = "cancelled"
        elif self.n_fed + 1 > n_ctx_seq:
            self.reason = "context_full"
        else:
            self.next_token = tok
            self.sampled.append(tok)

    def held(self) -> tuple[int, ...]:
        """The tokens whose KV state the sequence holds."""
        fed_sampled = max(0, self.n_fed - len(self.tokens))
        return tuple(self.tokens[:self.n_fed] + self.sampled[:fed_sampled])

    def _send(self, text: str, tok: int, now: float) -> None:
        self._out.append(text)
        self.emit(text, tok, self.n_gen, now)
        self.n_gen += 1

    def result(self) -> RunResult:
        if self._pending:
            self._out.append(self._pending)
            self.emit(self._pending, -1, self.n_gen, time.monotonic())
        now = time.monotonic()
        sp = self.spec
        return RunResult("".join(self._out), len(self.tokens), self.prompt_seconds,
                         self.t_received, self.t_first or now, self.t_last or now,
                         self.n_gen, self.reason or "cancelled", self.cached_tokens,
                         self.cache_tier, tuple(self.logprobs[:self.n_gen]),
                         sp.drafted if sp else 0, sp.accepted if sp else 0,
                         sp.used() if sp else "")


@dataclass
class _Slot:
    tok: int
    pos: int
    seq: int
    logits: bool


class Batch:
    """The sequences decoding together, and the llama_batch they share."""

    def __init__(self, rt: "Runtime") -> None:
        assert rt.ctx is not None and rt.info is not None
        self.rt = rt
        self.n_parallel = rt.info.n_parallel
        self.n_ctx_seq = rt.info.n_ctx // self.n_parallel
        self.capacity = rt.info.n_batch
        self._batch = L.llama_batch_init(self.capacity, 0, 1)
        self.free_ids = list(range(self.n_parallel))
        self.live: list[Sequence] = []
        self.ended: list[Sequence] = []  # done, replied to, their cells not yet freed

    def close(self) -> None:
        self._retire()
        for s in list(self.live):
            self._free(s)
        self.live.clear()
        L.llama_batch_free(self._batch)

    @property
    def full(self) -> bool:
        return not self.free_ids and not self.ended

    def join(self, request_id: str, tokens: list[int], g: GenerationConfig,
             t_received: float, emit: Callable[[str, int, int, float], None],
             cancelled: Callable[[], bool],
             drafts: Callable[[int, int], None] | None = None) -> Sequence:
        """Give the request a free sequence; it starts with the next step."""
        if not tokens:
            raise GenerationError("the prompt is empty", "Give some text to complete.")
        if len(tokens) >= self.n_ctx_seq:
            raise PromptTooLong(
                f"the prompt is {len(tokens):,} tokens, longer than a sequence's context of "
                f"{self.n_ctx_seq:,} tokens ({self.rt.info.n_ctx:,} shared by "
                f"{self.n_parallel} parallel sequences)",
                "Shorten the prompt, or reload with a larger --n-ctx or a smaller "
                "--n-parallel.")
        if not self.free_ids:
            self._retire()
        seq_id = self.free_ids.pop(0)
        seq = None
        try:
            seq = Sequence(self.rt, seq_id, request_id, tokens, g, t_received, emit,
                           cancelled, drafts)
            seq.cached_tokens, seq.cache_tier = self.rt._restore_prefix(
                tokens, L.llama_get_memory(self.rt.ctx), seq_id)
            seq.n_fed = seq.cached_tokens
        except BaseException:  # the request fails; its sequence id goes back
            if seq is not None:
                self._free(seq)
            self.free_ids.insert(0, seq_id)
            raise
        self.live.append(seq)
        return seq

    def step(self) -> list[Sequence]:
        """One llama_decode over every live sequence; returns the sequences that ended."""
        self._retire()
        slots: list[_Slot] = []
        fed: list[tuple[Sequence, int]] = []  # each sequence in the step, with its tokens
        gen = []
        for s in self.live:  # generating sequences first: one token each, and drafts
            s.logit_index, s.drafts = -1, []
            if not s.prefilling and s.next_token >= 0 and s.reason is None:
                if s.cancelled():
                    s.reason = "cancelled"
                    continue
                gen.append(s)
        n_tokens, expected = len(gen), float(len(gen))
        for s in gen:
            if s.spec is not None:
                room = min(STEP_LIMIT - n_tokens, self.capacity - n_tokens,
                           self.n_ctx_seq - s.n_fed - 1, s.g.max_tokens - s.n_gen - 1)
                try:
                    s.drafts = s.spec.plan(s.sampled, room, n_tokens, expected)
                except Exception:  # a draft model that fails: this request goes on without
                    traceback.print_exc()
                    s.spec.draft = None
                if s.drafts:
                    n_tokens += len(s.drafts)
                    expected += s.spec.expected - 1
            s.logit_index = len(slots)
            slots.append(_Slot(s.next_token, s.n_fed, s.seq_id, True))
            slots.extend(_Slot(d, s.n_fed + 1 + j, s.seq_id, True)
                         for j, d in enumerate(s.drafts))
            fed.append((s, 1 + len(s.drafts)))
        checking = len(slots)  # tokens that each need their logits
        for s in self.live:  # then prompts, as far as the batch has room
            room = self.capacity - len(slots)
            if room <= 0:
                break
            if s.prefilling and s.reason is None:
                if s.cancelled():
                    s.reason = "cancelled"
                    continue
                n = min(room, len(s.tokens) - s.n_fed)
                last = len(s.tokens) - 1
                slots.extend(_Slot(s.tokens[pos], pos, s.seq_id, pos == last)
                             for pos in range(s.n_fed, s.n_fed + n))
                if s.n_fed + n == len(s.tokens):
                    s.logit_index = len(slots) - 1
                fed.append((s, n))
        if fed:
            self._decode(slots, fed, checking == len(slots))
            gov = self.rt.governor
            if gov is not None:  # the tokens this step generated (prompts aside)
                gov.tick(time.monotonic(), len(gen))
        done = [s for s in self.live if s.reason is not None]
        for s in done:
            self._release(s)
        return done

    def _decode(self, slots: list[_Slot], fed: list[tuple[Sequence, int]],
                timed: bool) -> None:
        """Decode the step's slots, then sample each sequence's tokens. `timed`: a step
        of generating tokens only, whose time teaches the speculation's cost model."""
        b = self._batch
        for i, slot in enumerate(slots):
            b.token[i] = slot.tok
            b.pos[i] = slot.pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = slot.seq
            b.logits[i] = slot.logits
        b.n_tokens = len(slots)
        t0 = time.monotonic()
        rc = L.llama_decode(self.rt.ctx, b)
        if rc != 0:  # a failed step fails the requests in it; the others go on
            try:
                self.rt._check_decode(rc, f"a batch of {len(slots)} tokens")
            except GenerationError as e:
                for s, _ in fed:
                    s.reason, s.error = "error", e
            return
        if timed and self.rt.spec is not None:
            L.llama_synchronize(self.rt.ctx)
            self.rt.spec.costs.record(len(slots), time.monotonic() - t0)
        for s, n in fed:
            if s.logit_index < 0:
                s.n_fed += n
                continue
            try:  # a failure here is this sequence's alone
                self._check(s, s.n_fed + n - len(s.drafts) - 1)
            except Exception as e:
                s.reason, s.error, s.trace = "error", e, traceback.format_exc()

    def _sample(self, s: Sequence, i: int) -> int:
        if s.on_backend:
            tok = L.llama_get_sampled_token_ith(self.rt.ctx, i)
            L.llama_sampler_accept(s.chain, tok)
        else:
            sample = s.guided.sample if s.guided else L.llama_sampler_sample
            tok = sample(s.chain, self.rt.ctx, i)
        if s.g.logprobs is not None:
            s.logprobs.append(token_logprobs(self.rt.ctx, i, tok, self.rt.info.n_vocab,
                                             s.g.logprobs, self.rt._piece))
        return tok

    def _check(self, s: Sequence, n0: int) -> None:
        """Sample `s`'s positions in order from its logit index: its token (fed at n0),
        then each draft while the sample equals it. Cells of drafts not kept go."""
        drafts, accepted, first = s.drafts, 0, -1
        for j in range(len(drafts) + 1):
            s.n_fed = n0 + 1 + j  # the cells this sample conditions on
            tok = self._sample(s, s.logit_index + j)
            if j == 0:
                first = tok
            s.accept(tok, self.n_ctx_seq)
            if s.reason is not None or j == len(drafts) or tok != drafts[j]:
                break
            accepted += 1
        if drafts and s.n_fed < n0 + 1 + len(drafts):
            L.llama_memory_seq_rm(L.llama_get_memory(self.rt.ctx), s.seq_id, s.n_fed, -1)
        if s.spec is not None and first >= 0:
            s.spec.settle(len(drafts), accepted, first)
            if drafts and s.on_drafts is not None:
                s.on_drafts(s.spec.drafted, s.spec.accepted)

    def _free(self, s: Sequence, cells: bool = True) -> None:
        if cells:
            L.llama_memory_seq_rm(L.llama_get_memory(self.rt.ctx), s.seq_id, -1, -1)
        if s.on_backend:
            L.llama_set_sampler(self.rt.ctx, s.seq_id, None)
        if s.guided is not None:
            s.guided.free()
        L.llama_sampler_free(s.chain)

    def _release(self, s: Sequence) -> None:
        """An ended sequence leaves the batch; its cells are freed by `_retire`, once the
        worker has sent its reply (offering them to the prefix cache copies them)."""
        self.live.remove(s)
        self.ended.append(s)

    def _retire(self) -> None:
        cache = self.rt.cache
        for s in self.ended:
            if cache is not None and s.error is None:
                try:  # the cache failing must not fail the batch
                    cache.offer(s.held(), lambda s=s: self.rt.snapshot(s.seq_id))
                    cache.after_request()
                except Exception:
                    traceback.print_exc()
            self._free(s)
            self.free_ids.append(s.seq_id)
        self.ended.clear()


def run_one(rt: "Runtime", tokens: list[int], g: GenerationConfig, t_received: float,
            emit: Callable[[str, int, int, float], None],
            cancelled: Callable[[], bool],
            drafts: Callable[[int, int], None] | None = None) -> RunResult:
    """One request decoded alone, with speculation: a batch of one sequence (id 0), whose
    cells stay in the context for the prefix cache (`Runtime.offer_last`)."""
    batch = Batch(rt)
    try:
        seq = batch.join("", tokens, g, t_received, emit, cancelled, drafts)
        while batch.live:
            batch.step()
        if seq.error is not None:
            raise seq.error
        r = seq.result()
        rt.last_tokens = seq.held()
        batch.ended.remove(seq)
        batch._free(seq, cells=False)
        return r
    finally:
        batch.close()
