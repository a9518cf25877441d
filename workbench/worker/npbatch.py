"""A `llama_batch` whose arrays are numpy's: filling it costs no Python work per token,
and a token may belong to up to `n_seq` sequences at once."""

from __future__ import annotations

import ctypes

import llama_cpp as L
import numpy as np


class NumpyBatch:
    """`tok`, `pos`, `nseq`, `seq` (n x n_seq) and `out` (logits wanted) are the arrays
    `batch` points into; keep this object alive while llama.cpp reads the batch."""

    def __init__(self, n: int, n_seq: int = 1, logits: bool = False) -> None:
        self.tok = np.zeros(n, np.int32)
        self.pos = np.zeros(n, np.int32)
        self.nseq = np.ones(n, np.int32)
        self.seq = np.zeros((n, n_seq), np.int32)
        self._rows = self.seq.ctypes.data + 4 * n_seq * np.arange(n, dtype=np.uint64)
        self.out = np.full(n, 1 if logits else 0, np.int8)
        b = L.llama_batch()
        b.token = self.tok.ctypes.data_as(ctypes.POINTER(L.llama_token))
        b.pos = self.pos.ctypes.data_as(ctypes.POINTER(L.llama_pos))
        b.n_seq_id = self.nseq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._rows.ctypes.data,
                               ctypes.POINTER(ctypes.POINTER(L.llama_seq_id)))
        b.logits = self.out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.batch = b
