"""The one module that owns llama.cpp objects. It runs only inside the worker process.

Every llama.cpp failure is turned into a typed `WorkbenchError` here. The decode
loop uses llama.cpp's native sampler chain and does no per-token Python work
beyond handing each token on.
"""

from __future__ import annotations

import codecs
import ctypes
import time
from pathlib import Path
from typing import Callable

import llama_cpp as L

from .. import _paths
from ..config import GenerationConfig, LoadConfig
from ..errors import GenerationError, ModelFileError, PromptTooLong, WorkbenchError, no_model
from ..models.gguf_file import read_header
from ..engine.protocol import Buffer, ModelInfo
from .log import Log
from .params import context_params, model_params
from .result import RunResult
from .sampling import Guided, recording
from .template import render_chat
from .threads import ThreadGovernor

_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp: pick a random seed


class Runtime:
    """A loaded model and its context, with generation on top."""

    def __init__(self, echo_log: bool = False) -> None:
        self.log = Log(echo_log)
        L.llama_backend_init()
        self.model = None
        self.ctx = None
        self.vocab = None
        self.info: ModelInfo | None = None
        self.template: str | None = None
        self._bos_text = ""
        self._eos_text = ""
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(512)
        self.backend_sampling = False
        self.cache = None  # PrefixCache, when on
        self.last_tokens: tuple[int, ...] = ()  # whose KV state the context holds now
        self.notice: Callable[[str], None] = lambda text: None
        self.governor: ThreadGovernor | None = None  # re-chooses threads while decoding
        self.config: LoadConfig | None = None  # what the loaded model was loaded with
        self.spec = None  # speculative.Speculation of the loaded model
        self.scorer = None  # score.Scorer: a scoring context, made on the first request

    # ---- loading --------------------------------------------------------

    def load(self, path: str, cfg: LoadConfig, progress: Callable[[float], None]) -> ModelInfo:
        self.unload()
        header = read_header(path)  # a clear error before llama.cpp sees a bad file
        t0 = time.monotonic()
        mparams = model_params(cfg)

        def on_progress(fraction: float, _user: object) -> bool:
            progress(fraction)
            return True

        cb = L.llama_progress_callback(on_progress)
        mparams.progress_callback = cb
        self.log.clear()
        model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelFileError(
                f"llama.cpp could not load {path}: {self.log.last_error() or 'no reason given'}",
                "The file's header is valid, so llama.cpp may not support this architecture "
                f"({header.architecture!r}) or quantization ({header.quantization}); "
                "try a newer llama-cpp-python.")
        cparams = context_params(cfg)
        ctx = L.llama_init_from_model(model, cparams)
        if not ctx:
            L.llama_model_free(model)
            raise GenerationError(
                f"llama.cpp could not create a context of {cfg.n_ctx:,} tokens for {path}: "
                f"{self.log.last_error() or 'no reason given'}",
                "Try a smaller --n-ctx, or fewer --n-gpu-layers.")
        if cfg.lora:
            self._apply_lora(model, ctx, cfg)
        self.model, self.ctx = model, ctx
        self.backend_sampling = cfg.backend_sampling == "on"
        self._warm_up()
        self.vocab = L.llama_model_get_vocab(model)
        self._pieces = {}
        self.template = header.chat_template
        self._bos_text = self._special_text(L.llama_vocab_bos(self.vocab))
        self._eos_text = self._special_text(L.llama_vocab_eos(self.vocab))
        name = Path(path).name
        self.governor = None
        if cfg.max_threads:
            self.governor = ThreadGovernor(
                lambda n, c=ctx: L.llama_set_n_threads(c, n, n), cparams.n_threads,
                cfg.max_threads)
        if cfg.kv_cache == "on":  # batched sequences share it too (worker/batch.py)
            self.cache = self._open_cache(path, cfg)
        from ..models.inspect import inspect_header

        kv_per_token = inspect_header(header).kv_bytes_per_token(cfg.type_k, cfg.type_v)
        self.info = ModelInfo(
            path=str(path), name=str(name), architecture=header.architecture,
            quantization=header.quantization, n_params=header.n_params,
            file_bytes=header.file_size,
            n_layers=int(header.arch_value("block_count", 0)),
            n_ctx_train=int(header.arch_value("context_length", 0)),
            n_ctx=L.llama_n_ctx(ctx), n_gpu_layers=mparams.n_gpu_layers,
            threads=cparams.n_threads, n_batch=cfg.n_batch,
            has_chat_template=bool(self.template),
            load_seconds=time.monotonic() - t0, type_k=cfg.type_k, type_v=cfg.type_v,
            kv_bytes_per_token=kv_per_token, buffers=self.log.buffers(),
            flash_attn=cfg.flash_attn, n_ubatch=cparams.n_ubatch, lora=cfg.lora,
            n_parallel=cfg.n_parallel, rpc_servers=tuple(cfg.rpc_servers),
            n_vocab=L.llama_vocab_n_tokens(self.vocab),
            adapt_threads=self.governor is not None)
        self.config = cfg
        return self._load_draft(cfg)

    def _load_draft(self, cfg: LoadConfig) -> ModelInfo:
        """Set up speculative decoding as `cfg.draft` asks. A draft model that cannot be
        used leaves the model loaded without one, and says why in the ModelInfo."""
        import dataclasses

        from .speculative import MODES, DraftModel, Speculation

        assert self.info is not None
        self.spec = Speculation(cfg.draft if cfg.draft in MODES else "auto")
        if cfg.draft in MODES:
            self.info = dataclasses.replace(self.info, draft=cfg.draft)
            return self.info
        try:
            self.spec.draft = DraftModel(self, cfg.draft, self.info.n_gpu_layers)
        except WorkbenchError as e:
            self.info = dataclasses.replace(self.info, draft="auto", draft_error=e.message,
                                            draft_hint=e.hint)
        else:
            self.info = dataclasses.replace(self.info, draft=cfg.draft,
                                            draft_params=self.spec.draft.n_params)
        return self.info

    def _apply_lora(self, model, ctx, cfg: LoadConfig) -> None:
        """Load a GGUF LoRA and set it on the context (freed with the model)."""
        path = str(Path(cfg.lora).expanduser())
        self.log.clear()
        adapter = L.llama_adapter_lora_init(model, path.encode())
        if adapter:
            adapters = (L.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(cfg.lora_scale)
            if L.llama_set_adapters_lora(ctx, adapters, 1, scales) == 0:
                return
        why = self.log.last_error() or "no reason given"
        L.llama_free(ctx)
        L.llama_model_free(model)
        raise ModelFileError(f"llama.cpp could not apply the LoRA {path}: {why}",
                             "The adapter must be a GGUF LoRA trained on this base model "
                             "(same architecture and tensor shapes), as %finetune writes.")

    def measure_buffers(self, path: str, cfg: LoadConfig) -> tuple[Buffer, ...]:
        """The buffers llama.cpp would allocate for `cfg`, from a dry run that allocates
        none (the model's metadata is read; no weight is). Compute buffers are what this
        measures well: model and KV buffers report zero in a dry run, and the planner
        prices those from the file."""
        read_header(path)
        mparams = model_params(cfg)
        mparams.no_alloc = True
        mparams.load_mode = L.LLAMA_LOAD_MODE_NONE  # a dry run maps nothing
        self.log.clear()
        model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelFileError(f"llama.cpp could not read {path}: "
                                 f"{self.log.last_error() or 'no reason given'}",
                                 "Check the file with workbench.inspect_model().")
        try:
            ctx = L.llama_init_from_model(model, context_params(cfg))
            if not ctx:
                raise GenerationError(f"llama.cpp could not plan a context of {cfg.n_ctx:,} "
                                      f"tokens: {self.log.last_error() or 'no reason given'}",
                                      "Try a smaller --n-ctx.")
            L.llama_free(ctx)
        finally:
            L.llama_model_free(model)
        return self.log.buffers()

    def _open_cache(self, path: str, cfg: LoadConfig):
        import hashlib

        from ..kvcache.cache import PrefixCache
        from ..models.hashing import file_sha256

        sha = file_sha256(path)
        lora = f"{file_sha256(cfg.lora)}@{cfg.lora_scale:g}" if cfg.lora else ""
        namespace = hashlib.sha256(
            f"{sha}|k={cfg.type_k}|v={cfg.type_v}|fa={cfg.flash_attn}|lora={lora}|"
            f"llama.cpp={L.__version__}".encode()
        ).hexdigest()
        root = Path(cfg.kv_dir).expanduser() if cfg.kv_dir else _paths.home() / "kv"
        return PrefixCache(root, namespace=namespace, model_sha256=sha,
                           llama_cpp=L.__version__, ram_bytes=cfg.kv_ram_mib << 20,
                           disk_bytes=cfg.kv_disk_mib << 20, notice=self.notice)

    # ---- KV state -------------------------------------------------------

    def snapshot(self, seq: int = 0) -> bytes:
        """The context's KV state of sequence `seq` (of 0: what `last_tokens` produced)."""
        n = L.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        got = L.llama_state_seq_get_data(self.ctx, buf, n, seq)
        return bytes(memoryview(buf)[:got])

    def restore(self, state, seq: int = 0) -> bool:
        """Load a KV state (bytes or a uint8 array) into sequence `seq`, without copying
        it. A state taken from one sequence loads into any other."""
        u8p = ctypes.POINTER(ctypes.c_uint8)
        if isinstance(state, bytes):
            ptr = ctypes.cast(ctypes.c_char_p(state), u8p)
        else:
            ptr = state.ctypes.data_as(u8p)
        return L.llama_state_seq_set_data(self.ctx, ptr, len(state), seq) > 0

    def offer_last(self) -> None:
        """Offer the state of the last request to the prefix cache (after replying)."""
        if self.cache is not None:
            self.cache.after_request()
            if self.last_tokens:
                self.cache.offer(self.last_tokens, self.snapshot)

    def _warm_up(self) -> None:
        """One decode of two tokens, so the first request does not pay for paging in the
        weights and building the compute graph (a second or more on a cold start)."""
        vocab = L.llama_model_get_vocab(self.model)
        bos = max(L.llama_vocab_bos(vocab), 0)
        eos = max(L.llama_vocab_eos(vocab), 0)
        arr = (L.llama_token * 2)(bos, eos)
        L.llama_decode(self.ctx, L.llama_batch_get_one(arr, 2))
        L.llama_synchronize(self.ctx)
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        n = L.llama_token_to_piece(self.vocab, token, self._piece_buf, 512, 0, True)
        return self._piece_buf.raw[:max(n, 0)].decode("utf-8", errors="replace")

    def unload(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None
        if self.spec is not None:
            self.spec.close()
            self.spec = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        self.last_tokens = ()
        if self.ctx:
            L.llama_free(self.ctx)
        if self.model:
            L.llama_model_free(self.model)
        self.model = self.ctx = self.vocab = None
        self.info = None
        self.governor = None

    @property
    def threads(self) -> int:
        """The decode threads in use now."""
        if self.governor is not None:
            return self.governor.current
        return self.info.threads if self.info is not None else 0

    # ---- text <-> tokens ------------------------------------------------

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        try:  # the kernel side refuses such text first (workbench/_text.py)
            raw = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise GenerationError(f"the prompt is not valid Unicode (a lone surrogate at "
                                  f"character {e.start})", "Remove that character.") from None
        cap = len(raw) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, True)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, True)
        return list(buf[:n])

    def check_tokens(self, tokens: tuple[int, ...], where: str = "the prompt") -> list[int]:
        n_vocab = L.llama_vocab_n_tokens(self.vocab)
        bad = [t for t in tokens if not 0 <= t < n_vocab]
        if bad:
            raise GenerationError(f"{where}: token id {bad[0]} is outside the vocabulary "
                                  f"(0..{n_vocab - 1})",
                                  "Pass token ids from this model's tokenizer.")
        return list(tokens)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            n = L.llama_token_to_piece(self.vocab, token, self._piece_buf, 512, 0, False)
            piece = self._piece_buf.raw[:max(n, 0)]
            self._pieces[token] = piece
        return piece

    def chat_prompt(self, messages: list[dict[str, str]], tools: str = "") -> tuple[str, bool]:
        """Render the model's chat template; returns (text, add_bos)."""
        assert self.info is not None
        if not self.template:
            raise GenerationError(f"{self.info.name} has no chat template in its GGUF file",
                                  "Use %%generate (or workbench.generate) with a raw prompt.")
        text = render_chat(self.template, messages, self._bos_text, self._eos_text,
                           self.info.name, tools=tools)
        # A template that writes the BOS text itself must not get a second one.
        add_bos = not (self._bos_text and text.startswith(self._bos_text))
        return text, add_bos

    # ---- generation -----------------------------------------------------

    def _sampler(self, g: GenerationConfig):
        self.check_tokens(tuple(t for t, _ in g.logit_bias), "logit_bias")
        params = L.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = L.llama_sampler_chain_init(params)
        add = L.llama_sampler_chain_add
        # bias and penalties change the logits, so they come first, for greedy too
        n_vocab = L.llama_vocab_n_tokens(self.vocab)
        if g.logit_bias:
            arr = (L.llama_logit_bias * len(g.logit_bias))(
                *(L.llama_logit_bias(token=t, bias=b) for t, b in g.logit_bias))
            add(chain, L.llama_sampler_init_logit_bias(n_vocab, len(g.logit_bias), arr))
        if (g.repeat_penalty, g.frequency_penalty, g.presence_penalty) != (1.0, 0.0, 0.0):
            add(chain, L.llama_sampler_init_penalties(n_vocab, 64, g.repeat_penalty,
                                                      g.frequency_penalty, g.presence_penalty))
        if g.temperature == 0:
            add(chain, L.llama_sampler_init_greedy())
            return chain
        if g.top_k > 0:
            add(chain, L.llama_sampler_init_top_k(g.top_k))
        add(chain, L.llama_sampler_init_top_p(g.top_p, 1))
        add(chain, L.llama_sampler_init_min_p(g.min_p, 1))
        add(chain, L.llama_sampler_init_temp(g.temperature))
        add(chain, L.llama_sampler_init_dist(_DEFAULT_SEED if g.seed is None else g.seed))
        return chain

    def _check_decode(self, rc: int, where: str) -> None:
        if rc == 0:
            return
        if rc == 1:
            raise GenerationError(f"the context is full ({where})",
                                  "Reload the model with a larger --n-ctx.")
        if rc == 2:
            raise GenerationError("generation was aborted", "Run the request again.")
        raise GenerationError(f"llama_decode failed with code {rc} ({where}): "
                              f"{self.log.last_error()}", "Reload the model and try again.")

    def run(self, tokens: list[int], g: GenerationConfig, t_received: float,
            emit: Callable[[str, int, int, float], None],
            cancelled: Callable[[], bool],
            drafts: Callable[[int, int], None] | None = None) -> RunResult:
        """Decode `tokens`, then sample until a stop condition; `emit(text, token, index, t)`
        is called for each generated token as soon as it exists, `drafts(drafted, accepted)`
        after each check of drafted tokens."""
        if self.ctx is None or self.info is None:
            raise no_model()
        ctx, vocab = self.ctx, self.vocab
        n_ctx, n_batch = self.info.n_ctx, self.info.n_batch
        n_prompt = len(tokens)
        if n_prompt == 0:
            raise GenerationError("the prompt is empty", "Give some text to complete.")
        if n_prompt >= n_ctx:
            raise PromptTooLong(
                f"the prompt is {n_prompt:,} tokens, longer than the context of {n_ctx:,} tokens",
                "Shorten the prompt, or reload with a larger context: "
                f"`%load_model ... --n-ctx {1 << (n_prompt + g.max_tokens).bit_length()}`.")
        mem = L.llama_get_memory(ctx)
        L.llama_memory_clear(mem, True)
        self.last_tokens = ()
        self.log.clear()
        if self.spec is not None and self.spec.sources(g.speculative):
            from .batch import run_one  # drafts checked in batches of the sequence's own

            return run_one(self, tokens, g, t_received, emit, cancelled, drafts)
        start, tier = self._restore_prefix(tokens, mem)
        chain = self._sampler(g)
        # On the backend the chain runs inside the graph and only the token id comes back;
        # llama.cpp refuses chains it cannot run there, which then sample on the host.
        guided = None  # a grammar (JSON schema) samples on the host, checked per token
        on_backend = self.backend_sampling and not g.json_schema and \
            L.llama_set_sampler(ctx, 0, chain)
        try:
            if g.json_schema:
                guided = Guided(self.vocab, g.json_schema, self.info.n_vocab)
                sample = guided.sample
            elif on_backend:
                get, accept = L.llama_get_sampled_token_ith, L.llama_sampler_accept

                def sample(chain, ctx, i):  # noqa: ANN001 - same signature as the host path
                    tok = get(ctx, i)
                    accept(chain, tok)
                    return tok
            else:
                sample = L.llama_sampler_sample
            lp: list = []
            if g.logprobs is not None:
                sample = recording(sample, self.info.n_vocab, g.logprobs, self._piece, lp)
            r = self._run(ctx, vocab, chain, sample, tokens, start, n_ctx, n_batch, g,
                          t_received, emit, cancelled)
            r.cached_tokens, r.cache_tier, r.logprobs = start, tier, tuple(lp[:r.generated])
            if self.cache is not None and start == 0 and r.finish_reason != "cancelled":
                self.cache.record_prompt(len(tokens), r.prompt_seconds)
            return r
        finally:
            if on_backend:
                L.llama_set_sampler(ctx, 0, None)
            if guided is not None:
                guided.free()
            L.llama_sampler_free(chain)

    def _restore_prefix(self, tokens: list[int], mem, seq: int = 0) -> tuple[int, str]:
        """Restore the longest cached prefix of `tokens` into sequence `seq` (empty until
        now); returns (its length, tier)."""
        if self.cache is None:
            return 0, ""
        hit = self.cache.lookup(tokens)
        if hit is None:
            return 0, ""
        n, state, tier = hit
        t0 = time.monotonic()
        # Keep only the shared prefix. Recurrent models cannot drop a tail, and sliding-
        # window models may have dropped early cells: then recompute rather than decode on
        # top of a state that does not match the tokens.
        # In a batch the other sequences' cells stay as they are.
        if not self.restore(state, seq) or not L.llama_memory_seq_rm(mem, seq, n, -1) \
                or L.llama_memory_seq_pos_min(mem, seq) > 0 \
                or L.llama_memory_seq_pos_max(mem, seq) != n - 1:
            L.llama_memory_seq_rm(mem, seq, -1, -1)
            return 0, ""
        self.cache.record_restore(tier, len(state), time.monotonic() - t0)
        return n, tier

    def _run(self, ctx, vocab, chain, sample, tokens, start, n_ctx, n_batch, g, t_received,
             emit, cancelled):
        now = time.monotonic
        n_prompt = len(tokens)
        arr = (L.llama_token * n_prompt)(*tokens)
        base = ctypes.addressof(arr)
        tp = ctypes.POINTER(L.llama_token)
        t0 = now()
        for pos in range(start, n_prompt, n_batch):
            if cancelled():
                return RunResult("", n_prompt, now() - t0, t_received, now(), now(), 0,
                                 "cancelled")
            n = min(n_batch, n_prompt - pos)
            batch = L.llama_batch_get_one(ctypes.cast(base + pos * 4, tp), n)
            self._check_decode(L.llama_decode(ctx, batch), "prompt")
        fed = list(tokens)  # the tokens whose KV state the context holds

        # The hot loop: C calls, a dict lookup and one queue put per token.
        decode, is_eog = L.llama_decode, L.llama_vocab_is_eog
        piece_of, pieces = self._piece, self._pieces
        tick = self.governor.tick if self.governor is not None else None
        utf8 = codecs.getincrementaldecoder("utf-8")("replace").decode
        one = (L.llama_token * 1)()
        batch1 = L.llama_batch_get_one(one, 1)
        stops, hold = g.stop, max((len(s) for s in g.stop), default=0)
        ignore_eos, max_tokens = g.ignore_eos, g.max_tokens
        out: list[str] = []
        pending = ""  # text held back while it could still start a stop string
        n_gen, reason = 0, "length"
        tok = sample(chain, ctx, -1)
        t_first = t_last = now()
        prompt_seconds = t_first - t0
        while True:
            if not ignore_eos and is_eog(vocab, tok):
                reason = "stop"
                break
            piece = pieces.get(tok) or piece_of(tok)
            text = utf8(piece)
            t_last = now()
            if stops:
                pending += text
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text, reason = pending[:cut], "stop_string"
                    out.append(text)
                    emit(text, tok, n_gen, t_last)
                    n_gen += 1
                    break
                text, pending = (pending[:-hold + 1], pending[-hold + 1:]) if hold > 1 \
                    else (pending, "")
            out.append(text)
            emit(text, tok, n_gen, t_last)
            n_gen += 1
            if n_gen >= max_tokens:
                break
            if cancelled():
                reason = "cancelled"
                break
            if n_prompt + n_gen > n_ctx:  # the next decode would need position n_ctx
                reason = "context_full"
                break
            if tick is not None:
                tick(t_last)
            one[0] = tok
            fed.append(tok)
            rc = decode(ctx, batch1)
            if rc:
                self._check_decode(rc, f"token {n_gen}")
            tok = sample(chain, ctx, -1)
        if pending and reason != "stop_string":
            out.append(pending)
            emit(pending, -1, n_gen, now())
        self.last_tokens = tuple(fed)
        return RunResult("".join(out), n_prompt, prompt_seconds, t_received, t_first, t_last,
                         n_gen, reason)
