"""Speculative decoding: draft several tokens cheaply, check them in one decode of the
target model.

Drafts come from two sources:
- n-gram lookup (`NgramLookup`): the tokens that followed the latest earlier occurrence
  of the last few tokens, in the prompt and the text so far. Free to make; it pays where
  text repeats (an edited file, a quoted document).
- a draft model (`DraftModel`): a smaller model with the same vocabulary, loaded in this
  worker (a file, or the target itself with layers removed), proposing its greedy
  continuation.

Checking (worker/batch.py) samples the target at each drafted position with the
request's own sampler chain, in order, and keeps drafts while they equal what was
sampled. A draft here is a function of the tokens so far (its distribution is a point
mass q), and for such a draft the rule of speculative sampling (keep d with probability
min(1, p(d)/q(d)) = p(d), else sample from p with d removed) is exactly "draw from p and
keep the draft when the two agree". So every token is drawn from the target's own
distribution with the same sampler state (seed, penalties, grammar) as plain decoding,
and greedy output is token for token the same.

Adaptive (`Speculator.plan`): each request estimates how often its drafts are accepted
(per source, and, for n-grams, per match length); `CostModel` learns what a decode of n
tokens costs on this machine now. The draft length is the one that maximizes expected
tokens per second, down to none, so a request that drafts badly decodes as plainly as
one that never drafts. While drafting is off, n-gram proposals are still compared with
what the target samples (free), so drafting resumes when the text starts to repeat.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import llama_cpp as L
import numpy as np

from ..errors import GenerationError, ModelFileError
from .params import context_params, model_params

if TYPE_CHECKING:
    from .runtime import Runtime

MAX_DRAFT = 16           # longest draft checked in one decode
# Most tokens a step with drafts decodes. Up to this size llama.cpp's CPU kernels compute
# each token exactly as alone (logits measured bit-identical up to 48 tokens, not at 64),
# so greedy output does not change with drafting.
STEP_LIMIT = 32
SOURCES = ("ngram", "model")
MODES = ("off", "ngram", "auto")  # the load-time settings that load no draft model
_PRIOR_SLOPE = 0.5       # before any measurement: each extra token costs half a decode
_HOPEFUL = 0.9          # the acceptance a draft model must pay at to be tried at all
_GAIN = 1.03             # a longer draft must promise 3% more tokens per second
_PROBE_FIRST, _PROBE_MOST = 16, 256  # steps between probes of a draft model left off,
# doubling after each probe that does not turn it back on


class CostModel:
    """Seconds per target decode of n tokens (each with logits), learned from every
    decode that checks drafts or decodes one token; shared by a model's requests."""

    def __init__(self) -> None:
        self._t: dict[int, float] = {}

    def record(self, n: int, seconds: float) -> None:
        old = self._t.get(n)
        self._t[n] = seconds if old is None else old + 0.2 * (seconds - old)

    def __call__(self, n: int) -> float:
        t = self._t
        if n in t:
            return t[n]
        below = max((m for m in t if m < n), default=None)
        above = min((m for m in t if m > n), default=None)
        if below is None and above is None:  # nothing measured: relative units
            return 1 + _PRIOR_SLOPE * (n - 1)
        if below is None:
            return t[above] * (1 + _PRIOR_SLOPE * (n - 1)) / (1 + _PRIOR_SLOPE * (above - 1))
        if above is not None:
            return t[below] + (t[above] - t[below]) * (n - below) / (above - below)
        # Beyond what was measured, no steeper than the prior: on a CPU the first extra
        # token costs most, so the last slope would keep longer drafts from being tried.
        prior = t[below] * _PRIOR_SLOPE / (1 + _PRIOR_SLOPE * (below - 1))
        lower = max((m for m in t if m < below), default=None)
        slope = prior if lower is None else \
            min(prior, (t[below] - t[lower]) / (below - lower))
        return t[below] + max(slope, 0.0) * (n - below)


class Acceptance:
    """How often a source's drafted tokens are accepted, as a decaying count of trials
    (a prior of one half, worth two trials, so one lucky draft does not decide)."""

    def __init__(self, prior: float = 0.5, weight: float = 2.0, decay: float = 0.9) -> None:
        self.hits, self.trials, self.decay = prior * weight, weight, decay

    def update(self, accepted: int, drafted: int) -> None:
        fails = 1 if accepted < drafted else 0  # trials stop at the first rejection
        self.hits = self.hits * self.decay + accepted
        self.trials = self.trials * self.decay + accepted + fails

    @property
    def rate(self) -> float:
        return self.hits / self.trials


def expected_tokens(a: float, k: int) -> float:
    """Tokens one check of k drafts yields when each is accepted with probability a
    (after the first rejection none is): 1 + a + ... + a^k."""
    return float(k + 1) if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)


def best_length(a: float, costs: CostModel, max_k: int, base_tokens: int = 1,
                base_expected: float = 1.0, draft_cost: float = 0.0) -> int:
    """The draft length (0..max_k) with the most expected tokens per second, for a step
    that already decodes `base_tokens` tokens yielding `base_expected` tokens."""
    best_k, best = 0, base_expected / costs(base_tokens)
    for k in range(1, max_k + 1):
        rate = (base_expected - 1 + expected_tokens(a, k)) / \
            (costs(base_tokens + k) + k * draft_cost)
        if rate > best * _GAIN:
            best_k, best = k, rate
    return best_k


class NgramLookup:
    """Continuations of earlier occurrences of the last n tokens (n from `n_max` down),
    indexed as the history grows: each n-gram maps to where it last ended."""

    def __init__(self, n_max: int = 5) -> None:
        self.n_max = n_max
        self.history: list[int] = []
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(n_max + 1)]
        self._indexed = 0  # n-grams ending at or before this index are in the index

    def extend(self, tokens: list[int]) -> None:
        self.history.extend(tokens)

    def propose(self, k: int) -> tuple[list[int], int]:
        """Up to k tokens that followed the longest earlier match of the history's end,
        and the match's length (0: none)."""
        h, n_all = self.history, len(self.history)
        for end in range(self._indexed + 1, n_all):  # not the suffix itself
            for n in range(1, min(self.n_max, end) + 1):
                self._index[n][tuple(h[end - n:end])] = end
        self._indexed = max(self._indexed, n_all - 1)
        for n in range(min(self.n_max, n_all), 0, -1):
            end = self._index[n].get(tuple(h[n_all - n:]))
            if end is not None:
                return h[end:end + k], n
        return [], 0


class DraftModel:
    """A small model with the target's vocabulary, in this worker, with one sequence of
    its own context per target sequence, kept in step with what the target accepted. A
    sequence's cells outlive its request: the next request in that sequence catches up
    only from where its tokens differ."""

    def __init__(self, rt: "Runtime", path: str, n_gpu_layers: int) -> None:
        from ..models.gguf_file import read_header

        assert rt.info is not None and rt.model is not None
        info = rt.info
        self.path = str(Path(path).expanduser())
        header = read_header(self.path)  # a clear error for a corrupt file, first
        if header.file_size >= info.file_bytes:
            raise ModelFileError(
                f"the draft {Path(self.path).name} ({header.file_size / 2**20:,.0f} MiB) is "
                f"not smaller than the model it drafts for ({info.file_bytes / 2**20:,.0f} MiB)",
                "A draft must be cheaper to run than the target: use a smaller model with "
                "the same vocabulary, or --draft pruned:K (the target less K layers).")
        self._check_memory(rt, header)
        cfg = rt.config
        mparams = model_params(type(cfg)(n_gpu_layers=n_gpu_layers))
        rt.log.clear()
        self.model = L.llama_model_load_from_file(self.path.encode(), mparams)
        if not self.model:
            raise ModelFileError(f"llama.cpp could not load the draft {self.path}: "
                                 f"{rt.log.last_error() or 'no reason given'}",
                                 "Check the file with workbench.inspect_model().")
        self.ctx = None
        try:
            self._check_vocab(rt)
            cparams = context_params(cfg)
            cparams.n_threads = cparams.n_threads_batch = rt.threads
            self.ctx = L.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise ModelFileError(f"llama.cpp could not create a context for the draft: "
                                     f"{rt.log.last_error() or 'no reason given'}",
                                     "Try a smaller --n-ctx.")
        except BaseException:
            self.free()
            raise
        self.n_vocab = info.n_vocab
        self.n_params = header.n_params
        self.file_bytes = header.file_size
        self.cost_per_token = 0.0  # seconds per drafted token, measured
        # until measured, a drafted token is priced as a decode of the model scaled by the
        # files' sizes (decoding one token reads every weight once)
        self.size_ratio = header.file_size / info.file_bytes
        self._fed: dict[int, list[int]] = {}
        self._batch = L.llama_batch_init(cparams.n_batch, 0, 1)
        self._n_batch = cparams.n_batch

    def _check_memory(self, rt: "Runtime", header) -> None:  # noqa: ANN001
        import psutil

        from ..models.inspect import inspect_header

        cfg, info = rt.config, rt.info
        kv = inspect_header(header).kv_bytes_per_token(cfg.type_k, cfg.type_v) * info.n_ctx
        need = header.file_size + kv
        free = psutil.virtual_memory().available - (512 << 20)
        where = "available RAM less 512 MiB"
        if cfg.ram_mib is not None:
            used = info.file_bytes + info.kv_bytes_per_token * info.n_ctx
            budget = (cfg.ram_mib << 20) - used
            if budget < free:
                free, where = budget, f"--ram-mib {cfg.ram_mib} less the loaded model"
        if need > free:
            raise ModelFileError(
                f"the draft {Path(self.path).name} needs {need / 2**20:,.0f} MiB (weights and "
                f"a KV cache of {info.n_ctx:,} tokens), more than the {max(free, 0) / 2**20:,.0f}"
                f" MiB left ({where})",
                "Use a smaller draft, a smaller --n-ctx, or --draft ngram (no memory).")

    def _check_vocab(self, rt: "Runtime") -> None:
        vocab = L.llama_model_get_vocab(self.model)
        n_t, n_d = rt.info.n_vocab, L.llama_vocab_n_tokens(vocab)
        name = Path(self.path).name
        hint = ("A draft must share the target's tokenizer: a smaller model of the same "
                "family, or --draft pruned:K.")
        if n_t != n_d:
            raise ModelFileError(f"the draft {name} has {n_d:,} tokens in its vocabulary, the "
                                 f"model {n_t:,}: their token ids do not mean the same text",
                                 hint)
        text = L.llama_vocab_get_text
        for tok in range(n_t):
            if text(vocab, tok) != text(rt.vocab, tok):
                raise ModelFileError(f"the draft {name}'s token {tok} is "
                                     f"{text(vocab, tok)!r}, the model's "
                                     f"{text(rt.vocab, tok)!r}: their vocabularies differ",
                                     hint)
        for what in ("bos", "eos"):
            f = getattr(L, f"llama_vocab_{what}")
            if f(vocab) != f(rt.vocab):
                raise ModelFileError(f"the draft {name}'s {what.upper()} token differs from "
                                     "the model's", hint)

    def propose(self, seq: int, history: list[int], k: int) -> list[int]:
        """The draft's greedy continuation of `history` (k tokens), decoding only what its
        sequence `seq` does not hold yet."""
        fed = self._fed.setdefault(seq, [])
        p = 0
        limit = min(len(fed), len(history) - 1)  # the last token is decoded for its logits
        while p < limit and fed[p] == history[p]:
            p += 1
        if p < len(fed):
            L.llama_memory_seq_rm(L.llama_get_memory(self.ctx), seq, p, -1)
            del fed[p:]
        tok = self._feed(seq, history[p:])
        out = [tok]
        while len(out) < k:
            tok = self._feed(seq, [tok])
            out.append(tok)
        return out

    def _feed(self, seq: int, tokens: list[int]) -> int:
        """Decode `tokens` after what `seq` holds; the greedy next token. The time of a
        one-token decode is what a drafted token costs (catching up on accepted text is
        part of a check's cost, and the prompt's only once)."""
        t0 = time.monotonic()
        fed, b = self._fed[seq], self._batch
        for start in range(0, len(tokens), self._n_batch):
            part = tokens[start:start + self._n_batch]
            for i, t in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, len(fed) + i, 1
                b.seq_id[i][0], b.logits[i] = seq, i == len(part) - 1
            b.n_tokens = len(part)
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                L.llama_memory_seq_rm(L.llama_get_memory(self.ctx), seq, -1, -1)
                fed.clear()
                raise GenerationError(f"the draft model's decode failed (code {rc})",
                                      "Load the model with --draft ngram.")
            fed.extend(part)
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1),
                                       shape=(self.n_vocab,))
        tok = int(logits.argmax())
        if len(tokens) == 1:
            dt = time.monotonic() - t0
            self.cost_per_token = dt if not self.cost_per_token else \
                self.cost_per_token + 0.2 * (dt - self.cost_per_token)
        return tok

    def forget(self, seq: int) -> None:
        if self._fed.pop(seq, None):
            L.llama_memory_seq_rm(L.llama_get_memory(self.ctx), seq, -1, -1)

    def free(self) -> None:
        if getattr(self, "_batch", None) is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None


class Speculation:
    """A loaded model's speculative decoding: the load's mode, its draft model (if any)
    and the decode costs its requests share."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # off | ngram | auto | model (a draft model is loaded)
        self.draft: DraftModel | None = None
        self.costs = CostModel()

    def sources(self, asked: str) -> tuple[str, ...]:
        """The draft sources a request asking `asked` (auto | ngram | model | off) uses."""
        if asked == "off":
            return ()
        if asked == "ngram":
            return ("ngram",)
        if asked == "model":
            if self.draft is None:
                raise GenerationError("speculative='model' needs a draft model, and none is "
                                      "loaded", "Load one with `%load_model ... --draft PATH` "
                                      "(or pruned:K), or use speculative='ngram'.")
            return ("model",)
        if self.mode == "off":
            return ()
        return ("ngram", "model") if self.draft is not None else ("ngram",)

    def close(self) -> None:
        if self.draft is not None:
            self.draft.free()
            self.draft = None


class Speculator:
    """One request's drafting: its sources, their acceptance, and its counts."""

    def __init__(self, spec: Speculation, sources: tuple[str, ...], seq: int,
                 prompt: list[int]) -> None:
        self.spec, self.seq = spec, seq
        self.lookup = NgramLookup() if "ngram" in sources else None
        if self.lookup is not None:
            self.lookup.extend(prompt)
        self.draft = spec.draft if "model" in sources else None
        self.history = list(prompt)  # prompt and sampled tokens
        self._prompt_len = len(prompt)
        self.acceptance: dict[str, Acceptance] = {}
        self.sources = sources
        self.drafted = self.accepted = 0
        self.expected = 1.0        # tokens the pending draft is expected to yield
        self.key = ""              # the source of the pending draft
        self.shadow: tuple[str, int] | None = None  # an n-gram guess not drafted
        self.off_steps = 0
        self.probe_every = _PROBE_FIRST

    def _acc(self, key: str) -> Acceptance:
        a = self.acceptance.get(key)
        if a is None:
            a = self.acceptance[key] = Acceptance()
        return a

    def plan(self, sampled: list[int], room: int, base_tokens: int = 1,
             base_expected: float = 1.0) -> list[int]:
        """The drafts to check after the last sampled token (at most `room`), given a
        step that already decodes `base_tokens` tokens yielding `base_expected`."""
        self._sync(sampled)
        self.key, self.shadow = "", None
        room = min(room, MAX_DRAFT)
        if room <= 0:
            return []
        costs = self.spec.costs
        best: tuple[float, str, list[int]] | None = None
        if self.lookup is not None:
            guess, n = self.lookup.propose(room)
            if guess:
                key = f"ngram{n}"
                a = self._acc(key).rate
                k = best_length(a, costs, len(guess), base_tokens, base_expected)
                if k:
                    best = (expected_tokens(a, k) / costs(base_tokens + k), key, guess[:k])
                else:
                    self.shadow = (key, guess[0])
        draft_cost = 0.0
        if self.draft is not None:
            draft_cost = self.draft.cost_per_token or costs(1) * self.draft.size_ratio
        # Beside n-gram lookup (auto), a draft model is tried only where it could pay if it
        # were nearly always right: where drafting and checking cost more than decoding (a
        # CPU, a draft not much smaller) it is never run, not even to catch up on the
        # prompt. Asked for alone, it runs, with its length sized as for any source.
        if self.draft is not None and (self.lookup is None or best_length(
                _HOPEFUL, costs, room, base_tokens, base_expected, draft_cost)):
            a = self._acc("model").rate
            k = best_length(a, costs, room, base_tokens, base_expected, draft_cost)
            if k:
                self.off_steps, self.probe_every = 0, _PROBE_FIRST
            else:
                self.off_steps += 1
                if self.off_steps >= self.probe_every:  # look again now and then
                    k, self.off_steps = 1, 0
                    self.probe_every = min(2 * self.probe_every, _PROBE_MOST)
            rate = expected_tokens(a, k) / (costs(base_tokens + k) + k * draft_cost)
            if k and (best is None or rate > best[0]):
                best = (rate, "model", self.draft.propose(self.seq, self.history, k))
        if best is None:
            return []
        self.key = best[1]
        self.shadow = None
        self.expected = expected_tokens(self._acc(self.key).rate, len(best[2]))
        return best[2]

    def _sync(self, sampled: list[int]) -> None:
        """Bring the history up to the tokens sampled so far (the prompt plus `sampled`)."""
        have = len(self.history) - self._prompt_len
        if len(sampled) > have:
            new = sampled[have:]
            self.history.extend(new)
            if self.lookup is not None:
                self.lookup.extend(new)

    def settle(self, drafted: int, accepted: int, first: int) -> None:
        """After a check: `accepted` of `drafted` drafts were kept; `first` is the token
        sampled at the first position (for the n-gram guess made but not drafted)."""
        if drafted:
            self.drafted += drafted
            self.accepted += accepted
            self._acc(self.key).update(accepted, drafted)
        elif self.shadow is not None:
            key, guess = self.shadow
            self._acc(key).update(int(first == guess), 1)
        self.key, self.shadow = "", None

    def used(self) -> str:
        return "+".join(self.sources)

