"""What the worker process and queue cost: decode and prompt speed of three paths,
side by side, repetitions alternating.

  (a) llama.cpp's own llama-bench (-p 512 -n 128 -d 0,512), built from the llama.cpp
      vendored in the installed llama-cpp-python's sdist, with the same CMake flags;
  (b) llama-cpp-python's Llama.generate, in this process;
  (c) the workbench: workbench.generate() through the worker process and its queues.

Each path: a 512-token prompt on an empty context, then 128 greedy tokens (so
generation runs at depth 512..640, as llama-bench's tg128 at -d 512).
Decode speed compares with llama-bench tg128@d512; TTFT (prompt time) with pp512@d0.

    python benchmarks/engine_overhead.py [--quick] [--gpu] [--model PATH]

--gpu offloads every layer (run it on a GPU machine; results go to
engine_overhead_gpu.json, which the CPU run quotes in its RESULT line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _native, _provenance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
N_PROMPT, N_GEN = 512, 128


def build_llama_bench(gpu: bool) -> Path:
    """llama-bench from the llama.cpp vendored in this llama-cpp-python (built once)."""
    if os.environ.get("LLAMA_BENCH"):
        return Path(os.environ["LLAMA_BENCH"])
    return _native.build_tool("llama-bench", gpu)


def run_native(exe: Path, model: Path, threads: int, ngl: int, fa: str) -> dict[str, float]:
    out = subprocess.run(
        [str(exe), "-m", str(model), "-t", str(threads), "-ngl", str(ngl), "-fa", fa,
         "-p", str(N_PROMPT),
         "-n", str(N_GEN), "-d", "0,512", "-r", "1", "-o", "json"],
        capture_output=True, text=True, check=True).stdout
    res: dict[str, float] = {}
    for t in json.loads(out):
        kind = "pp" if t["n_gen"] == 0 else "tg"
        res[f"{kind}_d{t['n_depth']}_tps"] = float(t["avg_ts"])
    res["prompt_s"] = N_PROMPT / res["pp_d0_tps"]
    return res


def run_llama_cpp_python(llm, tokens: list[int]) -> dict[str, float]:
    llm.reset()
    t0 = time.perf_counter()
    t_first = t_last = t0
    n = 0
    for _ in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        n += 1
        t_last = time.perf_counter()
        if n == 1:
            t_first = t_last
        if n >= N_GEN:
            break
    return {"prompt_s": t_first - t0, "decode_tps": (n - 1) / (t_last - t_first)}


def run_workbench(tokens: list[int]) -> dict[str, float]:
    import workbench

    c = workbench.generate(tokens, max_tokens=N_GEN, temperature=0, ignore_eos=True)
    m = c.metrics
    assert m.generated_tokens == N_GEN, m
    return {"prompt_s": m.ttft_s, "decode_tps": m.decode_tps, "prompt_tps": m.prompt_tps}


def synthetic_model(shape: str, vocab: str | None) -> Path:
    """A Q4_1 model of `shape` with random weights (cached)."""
    import ctypes

    import llama_cpp

    from workbench.api import resolve_model
    from workbench.models.synthetic import make_synthetic

    out = CACHE / f"synthetic-{shape}.Q4_1.gguf"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    f16 = make_synthetic(CACHE / f"synthetic-{shape}.F16.gguf", shape,
                         tokenizer_from=vocab or resolve_model(None))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
    params.nthread = os.cpu_count() or 2
    tmp = out.with_name(out.name + ".partial")
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(),
                                      ctypes.byref(params)) != 0:
        raise SystemExit(f"quantizing {f16} failed")
    os.replace(tmp, out)
    f16.unlink()
    return out


def model_arguments(ap: argparse.ArgumentParser) -> None:
    """--model, --synthetic and --vocab: the model a benchmark measures."""
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--synthetic", default=None, metavar="SHAPE",
                    help="instead of --model: random weights of this shape (e.g. smollm2-135m), "
                         "quantized to Q4_1 like the default model (a GPU machine may lack "
                         "the default model's file)")
    ap.add_argument("--vocab", default=None,
                    help="GGUF file whose tokenizer the synthetic model copies "
                         "(default: the default model)")


def chosen_model(args: argparse.Namespace) -> Path:
    from workbench.api import resolve_model

    return synthetic_model(args.synthetic, args.vocab) if args.synthetic \
        else resolve_model(args.model)


def prompt_tokens(llm) -> list[int]:
    import inspect

    import workbench

    text = inspect.getdoc(workbench.engine().__class__) or ""
    text += "\n" + (inspect.getdoc(subprocess) or "")
    tokens = llm.tokenize(text.encode(), add_bos=False)
    while len(tokens) < N_PROMPT:
        tokens += tokens
    return tokens[:N_PROMPT]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 repetitions instead of 5")
    ap.add_argument("--gpu", action="store_true", help="offload all layers to the GPU")
    model_arguments(ap)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--backend-sampling", choices=("on", "off", "auto"), default="auto",
                    help="for (c): sample inside the graph (auto: on with --gpu)")
    ap.add_argument("--tag", default="", help="suffix for the results file name")
    ap.add_argument("--flash-attn", choices=("on", "off", "auto"), default=None,
                    help="for all three paths (default: off on the CPU, on with --gpu)")
    args = ap.parse_args()

    import llama_cpp
    import psutil

    import workbench

    model = chosen_model(args)
    threads = args.threads or (psutil.cpu_count(logical=False) or 2)
    reps = args.reps or (3 if args.quick else 5)
    ngl = 999 if args.gpu else 0
    fa = args.flash_attn or ("on" if args.gpu else "off")
    exe = build_llama_bench(args.gpu)

    # llama-bench sizes its context to what a test needs: 512 + 128 for tg128 at depth 512.
    # The KV cache's size changes decode speed, so (b) and (c) use the same.
    n_ctx = N_PROMPT + N_GEN
    llm = llama_cpp.Llama(str(model), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, n_gpu_layers=ngl, verbose=False,
                          flash_attn=fa == "on")
    workbench.load_model(model, progress=False, n_ctx=n_ctx, threads=threads,
                         n_gpu_layers=-1 if args.gpu else 0, flash_attn=fa,
                         backend_sampling=args.backend_sampling,
                         # every repetition sends the same prompt: measure computing it,
                         # not restoring it (benchmarks/kv_cache.py measures that)
                         kv_cache="off")
    tokens = prompt_tokens(llm)
    # warm-up of (b) and (c): page in weights, build graphs
    run_llama_cpp_python(llm, tokens)
    run_workbench(tokens)

    runs: dict[str, list[dict[str, float]]] = {"native": [], "llama_cpp_python": [],
                                               "workbench": []}
    for rep in range(reps):
        # alternate the order, so no path always runs right after another
        order = [("native", lambda: run_native(exe, model, threads, ngl, fa)),
                 ("llama_cpp_python", lambda: run_llama_cpp_python(llm, tokens)),
                 ("workbench", lambda: run_workbench(tokens))]
        if rep % 2:
            order.reverse()
        for name, fn in order:
            runs[name].append(fn())
        print(f"rep {rep + 1}/{reps}: " + "  ".join(
            f"{k}: " + ", ".join(f"{kk}={vv:.3g}" for kk, vv in v[-1].items())
            for k, v in runs.items()), file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    a_tg, a_prompt = med("native", "tg_d512_tps"), med("native", "prompt_s")
    b_tg, b_prompt = med("llama_cpp_python", "decode_tps"), med("llama_cpp_python", "prompt_s")
    c_tg, c_prompt = med("workbench", "decode_tps"), med("workbench", "prompt_s")
    # per-repetition ratios (side by side), then their median
    ratio_runs = [
        {"decode_vs_native": c["decode_tps"] / a["tg_d512_tps"],
         "decode_vs_llama_cpp_python": c["decode_tps"] / b["decode_tps"],
         "ttft_vs_native": c["prompt_s"] / a["prompt_s"],
         "llama_cpp_python_decode_vs_native": b["decode_tps"] / a["tg_d512_tps"]}
        for a, b, c in zip(runs["native"], runs["llama_cpp_python"], runs["workbench"])]
    ratios = {k: statistics.median(r[k] for r in ratio_runs) for k in ratio_runs[0]}
    medians = {
        "native": {"pp512_d0_tps": med("native", "pp_d0_tps"),
                   "pp512_d512_tps": med("native", "pp_d512_tps"),
                   "tg128_d0_tps": med("native", "tg_d0_tps"), "tg128_d512_tps": a_tg,
                   "prompt_s": a_prompt},
        "llama_cpp_python": {"decode_tps": b_tg, "prompt_s": b_prompt},
        "workbench": {"decode_tps": c_tg, "ttft_s": c_prompt,
                      "prompt_tps": med("workbench", "prompt_tps")},
    }
    name = ("engine_overhead_gpu" if args.gpu else "engine_overhead") + args.tag
    _provenance.write(name, {
        "machine": _provenance.machine(),
        "model": {"path": str(model), "name": model.name, "sha256": _provenance.sha256(model),
                  "bytes": model.stat().st_size,
                  "synthetic": {"shape": args.synthetic, "vocab": args.vocab}
                  if args.synthetic else None},
        "params": {"threads": threads, "n_prompt": N_PROMPT, "n_gen": N_GEN, "n_ctx": n_ctx,
                   "n_gpu_layers": ngl, "flash_attn": fa, "sampling": "greedy", "reps": reps,
                   "kv_cache": "off",
                   "backend_sampling": args.backend_sampling,
                   "llama_bench": str(exe), "llama_bench_args": f"-p 512 -n 128 -d 0,512 -r 1 -fa {fa}"},
        "medians": medians, "ratios": ratios, "ratio_runs": ratio_runs, "runs": runs,
    })
    result = {"decode_vs_native": ratios["decode_vs_native"],
              "decode_vs_llama_cpp_python": ratios["decode_vs_llama_cpp_python"],
              "ttft_vs_native": ratios["ttft_vs_native"]}
    gpu_file = _provenance.RESULTS / "engine_overhead_gpu.json"
    if args.gpu:
        result = {"decode_vs_native_gpu": ratios["decode_vs_native"],
                  "decode_vs_llama_cpp_python_gpu": ratios["decode_vs_llama_cpp_python"]}
    elif gpu_file.exists():
        result["decode_vs_native_gpu"] = json.loads(gpu_file.read_text())["ratios"][
            "decode_vs_native"]
    else:
        result["decode_vs_native_gpu"] = "not_measured"
    print(_provenance.result_line(result))


if __name__ == "__main__":
    main()
