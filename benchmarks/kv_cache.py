"""Time to first token with a shared prefix: recomputed (cold), restored from the RAM
tier, restored from the disk tier; and llama-cpp-python's LlamaRAMCache and
LlamaDiskCache on the same prompts. Plus the disk tier's size per token, by codec.

    python benchmarks/kv_cache.py [--quick]

For each shared prefix of 512, 1024 and 2048 tokens (default model, 2 threads), each
repetition uses a fresh prefix (nothing cached), then asks three different questions
after it: the first computes everything, the second finds the prefix in RAM, the third
(after the RAM tier was emptied to disk) finds it on disk.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _provenance  # noqa: E402

PREFIXES = (512, 1024, 2048)
N_CTX = 4096
QUESTIONS = (" Question: what is this about?", " Question: who would read it?",
             " Question: summarise it in a line.")


def corpus() -> str:
    """Prose from the standard library's docstrings (an offline, real text)."""
    import argparse as a
    import collections
    import decimal
    import json
    import logging
    import subprocess
    import threading
    import unittest

    return "\n\n".join(inspect.getdoc(m) or "" for m in
                       (subprocess, threading, collections, json, decimal, logging,
                        unittest, a, inspect))


def prefix_tokens(llm, n: int, rep: int) -> list[int]:
    toks = llm.tokenize(f"Document {rep}-{n}.\n{corpus()}".encode(), add_bos=False)
    assert len(toks) >= n, len(toks)
    return toks[:n]


def ours(prefix: list[int], suffixes: list[list[int]]) -> dict[str, float]:
    import workbench

    out = {}
    for label, suffix in zip(("cold", "ram", "disk"), suffixes):
        if label == "disk":
            workbench.engine().kv("clear_ram")
        os.sync()  # no write-back of earlier files during the measurement (both sides)
        m = workbench.generate(prefix + suffix, max_tokens=1, temperature=0).metrics
        expected = {"cold": "", "ram": "ram", "disk": "disk"}[label]
        assert m.cache_tier == expected, (label, m.cache_tier, m.cached_tokens)
        out[label] = m.ttft_s
    return out


def theirs(llm, cache, prefix: list[int], suffixes: list[list[int]]) -> dict[str, float]:
    """TTFT of llama-cpp-python with `cache` attached: cold, then a hit."""
    llm.set_cache(cache)
    out = {}
    for label, suffix in zip(("cold", "hit"), suffixes[:2]):
        llm.reset()
        os.sync()
        t0 = time.perf_counter()
        first = None
        # consume the whole stream: the cache stores the state when the completion ends
        for _ in llm.create_completion(prefix + suffix, max_tokens=1, temperature=0,
                                       stream=True):
            first = first or time.perf_counter()
        out[label] = (first or time.perf_counter()) - t0
    return out


def codec_sizes(path: Path) -> dict[str, float]:
    """Compressed / raw size of one real disk entry's state, for each codec, and speeds."""
    from workbench.kvcache import store

    info = store.read_info(path)
    _, state = store.read_entry(path, namespace=info.namespace,
                                model_sha256=info.model_sha256, llama_cpp=info.llama_cpp)
    res = {"raw_bytes_per_token": len(state) / len(info.tokens)}
    for codec in ("zstd-shuffle", "zstd", "lz4"):
        t0 = time.perf_counter()
        packed = store.compress(state, codec)
        t1 = time.perf_counter()
        store.decompress(packed, codec)
        t2 = time.perf_counter()
        res[f"{codec}_ratio"] = len(packed) / len(state)
        res[f"{codec}_decompress_mb_s"] = len(state) / (t2 - t1) / 1e6
        res[f"{codec}_compress_mb_s"] = len(state) / (t1 - t0) / 1e6
    res["file_bytes_per_token"] = info.file_bytes / len(info.tokens)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions instead of 3")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    reps = 2 if args.quick else 3

    import llama_cpp
    from llama_cpp.llama_cache import LlamaDiskCache, LlamaRAMCache

    import workbench
    from workbench.api import resolve_model

    model = resolve_model(None)
    work = Path(tempfile.mkdtemp(prefix="kv-bench-"))
    try:
        workbench.load_model(model, progress=False, n_ctx=N_CTX, threads=args.threads,
                             kv_dir=str(work / "ours"), kv_ram_mib=2048, kv_disk_mib=8192)
        llm = llama_cpp.Llama(str(model), n_ctx=N_CTX, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
        ram_cache = LlamaRAMCache(capacity_bytes=2 << 30)
        disk_cache = LlamaDiskCache(cache_dir=str(work / "llama-disk"))
        suffixes = [llm.tokenize(q.encode(), add_bos=False) for q in QUESTIONS]
        rows: dict[int, dict[str, list[float]]] = {n: {} for n in PREFIXES}
        for rep in range(reps):
            for n in PREFIXES:
                runs = {}
                # alternate which side goes first
                order = ["ours", "ram", "disk"] if rep % 2 == 0 else ["disk", "ram", "ours"]
                for who in order:
                    prefix = prefix_tokens(llm, n, rep * 10 + order.index(who))
                    if who == "ours":
                        runs.update({f"ours_{k}": v for k, v in ours(prefix, suffixes).items()})
                    else:
                        cache = ram_cache if who == "ram" else disk_cache
                        runs.update({f"llama_{who}_{k}": v
                                     for k, v in theirs(llm, cache, prefix, suffixes).items()})
                for k, v in runs.items():
                    rows[n].setdefault(k, []).append(v)
                print(f"rep {rep + 1} prefix {n}: " + " ".join(
                    f"{k}={v * 1000:.0f}ms" for k, v in runs.items()), file=sys.stderr)
        entry = max((work / "ours").glob("*/*.wbkv"), key=lambda p: p.stat().st_size)
        sizes = codec_sizes(entry)
        disk_bytes_theirs = sum(p.stat().st_size for p in (work / "llama-disk").rglob("*")
                                if p.is_file())
        n_entries_theirs = len(disk_cache.cache)
    finally:
        workbench.engine().close()
        shutil.rmtree(work, ignore_errors=True)

    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rows.items()}
    ratios = {n: {
        "ram_hit_vs_cold": m["ours_ram"] / m["ours_cold"],
        "disk_hit_vs_cold": m["ours_disk"] / m["ours_cold"],
        "llama_ram_hit_vs_cold": m["llama_ram_hit"] / m["llama_ram_cold"],
        "llama_disk_hit_vs_cold": m["llama_disk_hit"] / m["llama_disk_cold"],
        "disk_hit_vs_llama_disk_hit": m["ours_disk"] / m["llama_disk_hit"],
    } for n, m in med.items()}
    worst = {k: max(r[k] for r in ratios.values()) for k in ratios[PREFIXES[0]]}
    _provenance.write("kv_cache", {
        "machine": _provenance.machine(),
        "model": {"path": str(model), "sha256": _provenance.sha256(model)},
        "params": {"prefixes": PREFIXES, "n_ctx": N_CTX, "threads": args.threads,
                   "reps": reps, "codec": "zstd-shuffle", "measure": "TTFT, kernel side, s"},
        "ttft_median_s": med, "ratios": ratios, "worst_ratios": worst, "sizes": sizes,
        "llama_disk_cache": {"bytes": disk_bytes_theirs, "entries": n_entries_theirs},
        "runs": rows,
    })
    size_vs_theirs = (sizes["file_bytes_per_token"] /
                      (disk_bytes_theirs / max(1, n_entries_theirs) / PREFIXES[-1]))
    print(_provenance.result_line({
        "ram_hit_vs_cold": worst["ram_hit_vs_cold"],
        "disk_hit_vs_cold": worst["disk_hit_vs_cold"],
        "compress_ratio": sizes["zstd-shuffle_ratio"],
        "vs_llama_disk_cache": worst["disk_hit_vs_llama_disk_hit"],
        "size_vs_llama_disk_cache": size_vs_theirs,
    }))


if __name__ == "__main__":
    main()
