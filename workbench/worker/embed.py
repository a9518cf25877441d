"""Sentence embeddings in the worker: an embedding model's llama.cpp objects.

A worker holds either a chat model (`runtime.Runtime`) or an embedder (this module),
never both in one context: an embedding context pools (`embeddings = true`, the
model's pooling type), needs a batch that holds a whole text, and decodes many short
sequences at once, settings that would change a chat context. So the session starts
a second worker for embeddings; a crash in one does not take the other.

Many texts go into one `llama_decode`, each under its own sequence id; llama.cpp
pools each sequence (`llama_get_embeddings_seq`), and the rows are L2-normalized, as
OpenAI's are. The batch is built in numpy arrays that a `llama_batch` points into,
so filling it costs no Python work per token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import llama_cpp as L

from ..errors import GenerationError, ModelFileError, WorkbenchError
from ..engine.protocol import ModelInfo
from ..models.embedding import pooling
from ..models.gguf_file import read_header
from .npbatch import NumpyBatch

_MAX_SEQ = 64  # sequences per decode: many short texts share one


class Embedder:
    """An embedding model and its pooling context."""

    def __init__(self, log: Any) -> None:
        self.log = log  # log.Log: llama.cpp's recent messages, for errors
        self.model = self.ctx = self.vocab = None
        self.info: ModelInfo | None = None
        self.pooling = ""

    def load(self, path: str, threads: int, n_gpu_layers: int, n_batch: int) -> ModelInfo:
        self.unload()
        header = read_header(path)
        self.pooling = pooling(header)  # a chat model is refused before llama.cpp loads it
        t0 = time.monotonic()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self.log.clear()
        model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelFileError(f"llama.cpp could not load {path}: "
                                 f"{self.log.last_error() or 'no reason given'}",
                                 "Try a newer llama-cpp-python for this architecture "
                                 f"({header.architecture!r}).")
        n_train = L.llama_model_n_ctx_train(model)
        # a text must fit one decode (a non-causal model sees its whole text at once)
        n_batch = n_batch or max(512, min(n_train, 8192))
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = min(_MAX_SEQ, L.llama_max_parallel_sequences())
        cp.n_threads = cp.n_threads_batch = threads
        cp.embeddings = True
        cp.pooling_type = L.LLAMA_POOLING_TYPE_UNSPECIFIED  # the model's own
        cp.no_perf = True
        ctx = L.llama_init_from_model(model, cp)
        if not ctx:
            L.llama_model_free(model)
            raise GenerationError(f"llama.cpp could not create an embedding context for "
                                  f"{path}: {self.log.last_error() or 'no reason given'}",
                                  "Try a smaller batch (n_batch).")
        self.model, self.ctx = model, ctx
        self.vocab = L.llama_model_get_vocab(model)
        self.n_batch, self.n_seq = n_batch, cp.n_seq_max
        self.n_train = n_train if n_train > 0 else n_batch
        self.dim = L.llama_model_n_embd(model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        # the batch: numpy arrays that a llama_batch points into
        nb = self._nb = NumpyBatch(n_batch, logits=True)  # the batch, in numpy arrays
        self._tok, self._pos, self._seq, self._batch = nb.tok, nb.pos, nb.seq, nb.batch
        self.info = ModelInfo(
            path=str(path), name=Path(path).name, architecture=header.architecture,
            quantization=header.quantization, n_params=header.n_params,
            file_bytes=header.file_size, n_layers=int(header.arch_value("block_count", 0)),
            n_ctx_train=n_train, n_ctx=n_batch, n_gpu_layers=n_gpu_layers, threads=threads,
            n_batch=n_batch, has_chat_template=False, load_seconds=time.monotonic() - t0,
            n_ubatch=n_batch, n_parallel=self.n_seq, n_vocab=self.n_vocab)
        return self.info

    def unload(self) -> None:
        if self.ctx is not None:
            L.llama_free(self.ctx)
        if self.model is not None:
            L.llama_model_free(self.model)
        self.model = self.ctx = self.vocab = self.info = None

    def _tokens(self, i: int, x: str | tuple[int, ...]) -> Any:
        import numpy as np

        if isinstance(x, str):
            raw = x.encode("utf-8")
            buf = (L.llama_token * (len(raw) + 8))()
            n = L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), True, False)
            if n < 0:  # more tokens than bytes + 8: ask again with the size it needs
                buf = (L.llama_token * -n)()
                n = L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), True, False)
            toks = np.frombuffer(buf, np.int32, n)
        else:
            toks = np.asarray(x, np.int32)
            if toks.min() < 0 or toks.max() >= self.n_vocab:
                raise WorkbenchError(f"input {i} holds a token id outside 0..{self.n_vocab - 1}",
                                     "Token arrays must come from this model's tokenizer.")
        limit = min(self.n_train, self.n_batch)
        if len(toks) > limit:
            raise WorkbenchError(f"input {i} is {len(toks):,} tokens; this model embeds at "
                                 f"most {limit:,}", "Split the text into shorter passages.")
        if not len(toks):
            raise WorkbenchError(f"input {i} has no tokens", "Every input must hold text.")
        return toks

    def embed(self, inputs: tuple[str | tuple[int, ...], ...]) -> tuple[Any, int]:
        """The inputs' L2-normalized embeddings (n x dim float32) and their token count."""
        import numpy as np

        if self.ctx is None:
            raise WorkbenchError("no embedding model is loaded",
                                 "Call workbench.embed(texts, model=...) with one.")
        toks = [self._tokens(i, x) for i, x in enumerate(inputs)]
        out = np.empty((len(toks), self.dim), np.float32)
        mem = L.llama_get_memory(self.ctx)
        start, total = 0, 0
        while start < len(toks):  # one decode per batch of whole texts
            end, n = start, 0
            while end < len(toks) and end - start < self.n_seq \
                    and n + len(toks[end]) <= self.n_batch:
                t = toks[end]
                self._tok[n:n + len(t)] = t
                self._pos[n:n + len(t)] = np.arange(len(t), dtype=np.int32)
                self._seq[n:n + len(t)] = end - start
                n += len(t)
                end += 1
            self._batch.n_tokens = n
            self.log.clear()
            rc = L.llama_decode(self.ctx, self._batch)
            if rc != 0:
                raise GenerationError(f"llama.cpp could not embed (llama_decode returned "
                                      f"{rc}): {self.log.last_error() or 'no reason given'}",
                                      "Try fewer or shorter inputs.")
            for s in range(end - start):
                ptr = L.llama_get_embeddings_seq(self.ctx, s)
                if not ptr:
                    raise GenerationError("llama.cpp returned no pooled embedding",
                                          f"The model's pooling is {self.pooling}.")
                out[start + s] = np.ctypeslib.as_array(ptr, (self.dim,))
            if mem:  # a causal embedder keeps KV cells: free them for the next batch
                L.llama_memory_clear(mem, True)
            total += n
            start = end
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.maximum(norms, 1e-12)
        return out, total
