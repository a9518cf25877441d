"""Placement: is the planner's memory prediction right, and is its choice fast?

1. Memory: for each configuration, the planner's predicted peak (host resident memory,
   and GPU memory) against the peak measured in a fresh worker that filled its whole
   context.
2. Choice: the planner's configuration (`--device auto`) against an exhaustive sweep of
   n_gpu_layers × threads, decode tokens/s measured in alternating rounds.
With --gpu (a CUDA build; see ../shared/gpu/README.md), also:
3. The peer: llama.cpp's own fitter (`llama-fit-params`, common/fit.cpp) under the same
   GPU memory caps: its choice and projected memory next to ours, both run and measured.
4. Speed next to llama-bench on the same build: CPU only, partial splits, full offload.
5. A forced split: another process holds GPU memory until the model no longer fits;
   the planner's choice, a naive split (layers in proportion to the memory left, f16
   KV cache) and llama.cpp's fitter each load and run, or fail to load.
Host peaks count from the end of the load (see worker/main.py `_reset_peak_rss`);
the load's own peak, which maps every weight once, is recorded beside them.

Usage: python benchmarks/placement.py [--quick] [--gpu --synthetic llama-2-7b --vocab V]
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
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _provenance  # noqa: E402

from workbench.device.calibrate import fill_context  # noqa: E402

MiB, GiB = 2 ** 20, 2 ** 30


class GpuMemory:
    """Memory used on GPU 0, as NVML (or nvidia-smi) sees it; the device is ours alone."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv, self.h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self.nv = None

    def _info(self) -> tuple[int, int]:
        if self.nv is not None:
            i = self.nv.nvmlDeviceGetMemoryInfo(self.h)
            return int(i.used), int(i.free)
        out = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=memory.used,memory.free",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             check=True).stdout.split(",")
        return int(out[0]) * MiB, int(out[1]) * MiB

    def used(self) -> int:
        time.sleep(0.2)  # let a freed context's memory show as free
        return self._info()[0]

    def free(self) -> int:
        return self._info()[1]


class GpuBallast:
    """Holds `nbytes` of GPU 0 in a process of its own (cudaMalloc through ctypes), so
    the worker meets a GPU with less free memory, as on a smaller card."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(0, nbytes)

    def __enter__(self) -> "GpuBallast":
        code = ("import ctypes, ctypes.util, glob, sys\n"
                "names = [ctypes.util.find_library('cudart')] + sorted(glob.glob("
                "'/usr/local/cuda*/lib64/libcudart.so*'))\n"
                "rt = ctypes.CDLL(next(n for n in names if n))\n"
                "p = ctypes.c_void_p()\n"
                "err = rt.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(int(sys.argv[1])))\n"
                "print('ready' if err == 0 else f'cudaMalloc error {err}', flush=True)\n"
                "sys.stdin.read()\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.nbytes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.__exit__()
            raise RuntimeError(f"could not hold {self.nbytes / MiB:,.0f} MiB of GPU memory: "
                               f"{line or 'the process exited'}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def fresh() -> Any:
    """A new worker, so that its peak memory is one configuration's alone."""
    import workbench

    workbench.engine().close()
    time.sleep(0.5)
    return workbench.engine()


def measure_memory(model: Path, settings: dict[str, Any], gpu: GpuMemory | None,
                   n_vocab: int) -> dict[str, Any]:
    import workbench

    fresh()
    base_gpu = gpu.used() if gpu else 0
    loaded = workbench.load_model(model, progress=False, kv_cache="off", **settings)
    p = loaded.placement
    c = fill_context(workbench.api.session(), p.settings["n_ctx"], n_vocab)
    row = {"settings": settings, "chosen": {k: p.settings[k] for k in
                                            ("n_gpu_layers", "n_ctx", "type_k", "flash_attn")},
           "host_predicted": p.predicted("CPU"), "host_measured": c.metrics.peak_rss_bytes,
           "host_load_peak": loaded.info.load_peak_rss_bytes,
           "calibration_applied": {"host": p.overheads.host_correction,
                                   "gpu": p.overheads.gpu_correction}}
    row["host_err"] = row["host_predicted"] / row["host_measured"] - 1
    if gpu and p.settings["n_gpu_layers"] > 0:
        row["gpu_predicted"] = p.predicted("CUDA0")
        row["gpu_measured"] = gpu.used() - base_gpu
        row["gpu_err"] = row["gpu_predicted"] / row["gpu_measured"] - 1
    print(f"  {settings}: host {row['host_predicted'] / MiB:,.0f} vs "
          f"{row['host_measured'] / MiB:,.0f} MiB ({row['host_err']:+.1%})"
          + (f"; GPU {row['gpu_predicted'] / MiB:,.0f} vs {row['gpu_measured'] / MiB:,.0f} MiB "
             f"({row['gpu_err']:+.1%})" if "gpu_err" in row else ""), file=sys.stderr)
    return row


def speed(model: Path, settings: dict[str, Any], n_prompt: int, n_gen: int,
          n_vocab: int, load: bool = True) -> dict[str, float]:
    """Prompt tokens/s (n_prompt from an empty context) and decode tokens/s after it.
    Its prompt shares no prefix with `fill_context`'s, so nothing is reused."""
    import workbench

    if load:
        workbench.load_model(model, progress=False, kv_cache="off", **settings)
    first = 1000 if n_vocab > 2000 else 0
    prompt = [first + (i * 7919 + 13) % (n_vocab - first) for i in range(n_prompt)]
    c = workbench.generate(prompt, max_tokens=n_gen, temperature=0.0, ignore_eos=True)
    return {"pp_tps": c.metrics.prompt_tps, "tg_tps": c.metrics.decode_tps}


def sweep(model: Path, configs: list[dict[str, Any]], rounds: int, n_prompt: int, n_gen: int,
          n_vocab: int) -> list[dict[str, Any]]:
    """Each configuration measured once per round, rounds alternating; median of rounds."""
    runs: list[list[dict[str, float]]] = [[] for _ in configs]
    for _ in range(rounds):
        for i, cfg in enumerate(configs):
            runs[i].append(speed(model, cfg, n_prompt, n_gen, n_vocab))
    out = []
    for cfg, rs in zip(configs, runs, strict=True):
        out.append({"settings": cfg,
                    "pp_tps": statistics.median(r["pp_tps"] for r in rs),
                    "tg_tps": statistics.median(r["tg_tps"] for r in rs)})
        print(f"  {cfg}: pp {out[-1]['pp_tps']:,.1f} tg {out[-1]['tg_tps']:,.1f} t/s",
              file=sys.stderr)
    return out


def llama_bench(exe: Path, model: Path, ngl: int, threads: int, n_prompt: int,
                n_gen: int) -> dict[str, float]:
    res = {}
    for args, key in ((["-p", str(n_prompt), "-n", "0"], "pp_tps"),
                      (["-p", "0", "-n", str(n_gen), "-d", str(n_prompt)], "tg_tps")):
        out = subprocess.run([str(exe), "-m", str(model), "-ngl", str(ngl), "-t", str(threads),
                              "-fa", "1" if ngl else "0", "-r", "2", "-o", "json", *args],
                             capture_output=True, text=True, check=True).stdout
        res[key] = float(json.loads(out)[0]["avg_ts"])
    return res


def fit_params(exe: Path, model: Path, n_ctx: int, margin_mib: int) -> dict[str, Any]:
    """llama.cpp's fitter: its choice for a margin, and its projection of that choice."""
    t = time.perf_counter()
    out = subprocess.run([str(exe), "-m", str(model), "-c", str(n_ctx), "-fa", "on",
                          "-fitt", str(margin_mib)], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    words = out.stdout.split()
    if out.returncode != 0 or "-ngl" not in words:
        return {"failed": True, "stderr": out.stderr[-400:], "seconds": seconds}
    ngl = int(words[words.index("-ngl") + 1])
    ctx = int(words[words.index("-c") + 1])
    proj = subprocess.run([str(exe), "-m", str(model), "-c", str(ctx), "-ngl", str(ngl),
                           "-fa", "on", "--fit-print", "on"], capture_output=True, text=True)
    gpu = 0
    for line in proj.stdout.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("CUDA0"):
            gpu = sum(int(x) for x in parts[1:4]) * MiB
    return {"n_gpu_layers": ngl, "n_ctx": ctx, "gpu_projected": gpu, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter contexts, fewer rounds")
    ap.add_argument("--gpu", action="store_true", help="the GPU parts (a CUDA build)")
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--synthetic", default=None, metavar="SHAPE",
                    help="make a Q4_0 synthetic model of SHAPE (e.g. llama-2-7b)")
    ap.add_argument("--vocab", default=None, help="GGUF whose tokenizer the synthetic copies")
    ap.add_argument("--tag", default="", help="suffix for the results file name")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated parts to run (default: all). The others are kept "
                         "from the results file, when it is of the same model and mode")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        ap.error(f"unknown part(s) {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}")

    import workbench
    from workbench.device.profile import usable_cores
    from workbench.models import synthetic
    from workbench.models.inspect import inspect_model

    cache = ROOT / "benchmarks" / ".cache"
    if args.synthetic:
        cache.mkdir(parents=True, exist_ok=True)
        model = cache / f"synthetic-{args.synthetic}.Q4_0.gguf"
        if not model.exists():
            synthetic(args.synthetic, "q4_0", model, tokenizer_from=args.vocab)
    else:
        model = workbench.api.resolve_model(args.model)
    m = inspect_model(model)
    cores = usable_cores()
    gpu = GpuMemory() if args.gpu else None
    rounds = (1 if args.gpu else 2) if args.quick else 3
    n_prompt, n_gen = (256, 32) if args.quick else (512, 64)
    name = "placement" + (f"_{args.tag}" if args.tag else "")
    result: dict[str, Any] = {"machine": _provenance.machine(), "model": str(model.name),
                              "model_sha256": _provenance.sha256(model),
                              "params": {"quick": args.quick, "n_prompt": n_prompt,
                                         "n_gen": n_gen, "rounds": rounds, "gpu": args.gpu}}
    result.update(_earlier(name, result, parts))

    def save(final: bool = False) -> None:
        values = summarize(result)
        _provenance.write(name, {**result, "result": values,
                                 **({} if final else {"incomplete": True})})

    # 1. memory
    if "memory" in parts:
        print("memory: predicted vs measured peak", file=sys.stderr)
    if "memory" in parts and args.gpu:
        n = m.n_layers
        configs = [{"n_ctx": 4096}, {"n_ctx": 2048}, {"n_ctx": 4096, "type_k": "q8_0",
                                                      "type_v": "q8_0"},
                   {"n_ctx": 4096, "n_gpu_layers": n // 2},
                   {"n_ctx": 2048, "n_gpu_layers": 3 * n // 4}, {"n_ctx": 1024, "device": "cpu"}]
    elif "memory" in parts:
        big = 3072 if args.quick else 8192
        configs = [{"n_ctx": 1024}, {"n_ctx": 2048}, {"n_ctx": big},
                   {"n_ctx": 4096, "type_k": "q8_0", "type_v": "q8_0"},
                   {"n_ctx": big, "flash_attn": "on"}, {"n_ctx": 2048, "n_ubatch": 256},
                   {"n_ctx": 1024, "threads": 1}]
    if "memory" in parts:
        result["memory"] = [measure_memory(model, c, gpu, m.n_vocab) for c in configs]
        save()

    # 1b. tight RAM budgets: the plan gives up what costs least, and stays within the budget
    if "budgets" in parts and not args.gpu:
        print("budgets: plans under a RAM cap, loaded and measured", file=sys.stderr)
        budgets = []
        for cap_mib in ((240, 300) if args.quick else (230, 250, 280, 320, 400)):
            fresh()
            try:
                p = workbench.load_model(model, progress=False, kv_cache="off",
                                         ram_mib=cap_mib).placement
            except workbench.WorkbenchError as e:
                budgets.append({"cap_mib": cap_mib, "error": e.message})
                print(f"  {cap_mib} MiB: {e.message}", file=sys.stderr)
                continue
            chosen = {k: p.settings[k] for k in ("n_ctx", "type_k", "type_v", "flash_attn",
                                                 "n_ubatch")}
            c = fill_context(workbench.api.session(), chosen["n_ctx"], m.n_vocab)
            row = {"cap_mib": cap_mib, "chosen": chosen, "predicted": p.predicted("CPU"),
                   "measured": c.metrics.peak_rss_bytes,
                   "within_cap": c.metrics.peak_rss_bytes <= cap_mib * MiB}
            budgets.append(row)
            print(f"  {cap_mib} MiB: {chosen}, measured {row['measured'] / MiB:,.0f} MiB",
                  file=sys.stderr)
        result["budgets"] = budgets
        save()

    # 2. the planner's choice against an exhaustive sweep
    if "choice" in parts:
        choice(result, model, m, args.gpu, cores, rounds, n_prompt, n_gen)
        save()

    if args.gpu:
        gpu_parts(result, parts, save, model, m, gpu, cores, n_prompt, n_gen)
    workbench.engine().close()
    save(final=True)
    print(f"wrote {_provenance.RESULTS / name}.json", file=sys.stderr)
    print(_provenance.result_line(summarize(result)))


def choice(result: dict[str, Any], model: Path, m: Any, on_gpu: bool, cores: int,
           rounds: int, n_prompt: int, n_gen: int) -> None:
    import workbench

    print("choice: auto against a sweep of n_gpu_layers × threads", file=sys.stderr)
    fresh()
    auto = workbench.plan(model, kv_cache="off").settings
    grid_t = sorted({1, max(1, cores // 2), cores, cores + 1} if not on_gpu
                    else {cores // 2, cores})
    grid_l = [0] if not on_gpu else sorted({0, m.n_layers // 2, 3 * m.n_layers // 4,
                                            m.n_layers + 1})
    configs = [{"n_gpu_layers": g, "threads": t, "n_ctx": auto["n_ctx"]}
               for g in grid_l for t in grid_t]
    auto_cfg = {"n_gpu_layers": auto["n_gpu_layers"], "threads": auto["threads"],
                "n_ctx": auto["n_ctx"]}
    if auto_cfg not in configs:
        configs.append(auto_cfg)
    swept = sweep(model, configs, rounds, n_prompt, n_gen, m.n_vocab)
    best = max(swept, key=lambda r: r["tg_tps"])
    mine = next(r for r in swept if r["settings"] == auto_cfg)
    print(f"  auto {auto_cfg}: {mine['tg_tps']:,.1f} t/s; best {best['settings']}: "
          f"{best['tg_tps']:,.1f} t/s", file=sys.stderr)
    result["choice"] = {"auto": auto_cfg, "sweep": swept, "best": best["settings"],
                        "auto_vs_best": mine["tg_tps"] / best["tg_tps"]}


def gpu_parts(result: dict[str, Any], parts: set[str], save: Callable[[], None], model: Path,
              m: Any, gpu: GpuMemory, cores: int, n_prompt: int, n_gen: int) -> None:
    import workbench

    bench_exe = Path(os.environ.get("LLAMA_BENCH", "/tmp/llama-build/bin/llama-bench"))
    fit_exe = Path(os.environ.get("LLAMA_FIT_PARAMS", bench_exe.with_name("llama-fit-params")))
    weights_gpu = m.weight_bytes - m.input_bytes
    if "peer" in parts:
        # 3. the peer under GPU memory caps
        print("peer: llama-fit-params under the same caps", file=sys.stderr)
        result["peer"] = []
        caps = [None, int(weights_gpu * 1.1 + 2 * GiB), int(weights_gpu * 0.75),
                int(weights_gpu * 0.5)]
        for cap in caps:
            result["peer"].append(peer_row(model, m, gpu, fit_exe, cap, n_prompt, n_gen))
            save()
    if "speed" in parts and "choice" in result:
        # 4. speed next to llama-bench; ours: the sweep's runs (same prompt and generation)
        print("speed: ours vs llama-bench", file=sys.stderr)
        table = []
        workbench.engine().close()
        swept = result["choice"]["sweep"]
        for ngl in (0, m.n_layers // 2, 3 * m.n_layers // 4, m.n_layers + 1):
            ours = next(r for r in swept if r["settings"]["n_gpu_layers"] == ngl
                        and r["settings"]["threads"] == cores)
            ours = {"pp_tps": ours["pp_tps"], "tg_tps": ours["tg_tps"]}
            ref = llama_bench(bench_exe, model, ngl, cores, n_prompt, n_gen)
            table.append({"n_gpu_layers": ngl, "ours": ours, "llama_bench": ref,
                          "tg_ratio": ours["tg_tps"] / ref["tg_tps"]})
            print(f"  ngl {ngl}: ours {ours} llama-bench {ref}", file=sys.stderr)
        result["speed"] = table
        save()
    if "split" in parts:
        result["forced_split"] = forced_split(model, m, gpu, fit_exe, int(weights_gpu * 0.75),
                                              n_prompt, n_gen)


def peer_row(model: Path, m: Any, gpu: GpuMemory, fit_exe: Path, cap: int | None,
             n_prompt: int, n_gen: int) -> dict[str, Any]:
    """Ours and llama.cpp's fitter under one GPU cap: choice, projection, measured, speed."""
    import workbench

    fresh()
    free = gpu.free()
    cap_mib = (cap or free) // MiB
    margin = max(0, (free - (cap or free)) // MiB)
    theirs = fit_params(fit_exe, model, 4096, margin + (0 if cap else 1024))
    t0 = time.perf_counter()
    ours = workbench.plan(model, kv_cache="off", n_ctx=4096,
                          gpu_mem_mib=cap // MiB if cap else None)
    plan_s = time.perf_counter() - t0
    keys = ("n_gpu_layers", "n_ctx", "type_k", "type_v")
    row: dict[str, Any] = {"cap_mib": cap_mib, "theirs": theirs,
                           "ours": {k: ours.settings[k] for k in keys},
                           "ours_predicted": ours.predicted("CUDA0"), "ours_plan_s": plan_s}
    for who, settings in (("ours", row["ours"]),
                          ("theirs", None if theirs.get("failed") else
                           {"n_gpu_layers": theirs["n_gpu_layers"], "n_ctx": theirs["n_ctx"]})):
        if settings is None:
            continue
        fresh()
        base = gpu.used()
        workbench.load_model(model, progress=False, kv_cache="off", **settings)
        fill_context(workbench.api.session(), settings["n_ctx"], m.n_vocab)
        used = gpu.used() - base
        sp = speed(model, settings, n_prompt, n_gen, m.n_vocab, load=False)
        row[f"{who}_measured"] = used
        row[f"{who}_within_cap"] = used <= cap_mib * MiB
        row[f"{who}_tg_tps"] = sp["tg_tps"]
        row[f"{who}_pp_tps"] = sp["pp_tps"]
    # errors only where layers went to the GPU (else both predict no model there)
    if "theirs_measured" in row and theirs.get("gpu_projected") and theirs.get("n_gpu_layers"):
        row["theirs_err"] = theirs["gpu_projected"] / row["theirs_measured"] - 1
    if row.get("ours_measured") and ours.settings["n_gpu_layers"] > 0:
        row["ours_err"] = row["ours_predicted"] / row["ours_measured"] - 1
    print(f"  cap {cap_mib:,} MiB: ours ngl {row['ours']['n_gpu_layers']} "
          f"{row['ours']['type_k']} err {row.get('ours_err', 0):+.1%} "
          f"tg {row.get('ours_tg_tps', 0):,.1f}; theirs {theirs} "
          f"err {row.get('theirs_err', 0):+.1%} tg {row.get('theirs_tg_tps', 0):,.1f}",
          file=sys.stderr)
    return row


def forced_split(model: Path, m: Any, gpu: GpuMemory, fit_exe: Path, cap: int,
                 n_prompt: int, n_gen: int) -> dict[str, Any]:
    """5. Another process holds all but `cap` of the GPU's free memory, so the worker
    sees a GPU smaller than the model. The planner (from free memory, no cap given), a
    naive split (layers in proportion to the memory, f16 KV, not planned) and llama.cpp's
    fitter (its default margin) each load, fill 4,096 tokens and run, or fail to load."""
    import workbench
    from workbench.device.profile import usable_cores as usable_cores_

    print("forced split: a GPU holding less than the model", file=sys.stderr)
    split: dict[str, Any] = {}
    fresh()
    workbench.engine().close()
    with GpuBallast(gpu.free() - cap):
        left = gpu.free()
        theirs = fit_params(fit_exe, model, 4096, 1024)
        contenders = [("naive", {"n_gpu_layers": int(m.n_layers * cap / m.file_bytes),
                                 "n_ctx": 4096}),
                      ("fit_params", None if theirs.get("failed") else
                       {"n_gpu_layers": theirs["n_gpu_layers"], "n_ctx": theirs["n_ctx"]}),
                      ("planner", None)]
        for who, settings in contenders:
            fresh()
            base = gpu.used()
            try:
                if who == "planner":
                    p = workbench.plan(model, kv_cache="off", n_ctx=4096)
                    settings = {k: p.settings[k] for k in
                                ("n_gpu_layers", "n_ctx", "type_k", "type_v")}
                if settings is None:
                    split[who] = {"loaded": False, "error": theirs.get("stderr", "")}
                    continue
                if who == "naive":  # straight to the engine, as llama.cpp alone would
                    from workbench.config import LoadConfig

                    workbench.engine().load(model, LoadConfig(
                        n_gpu_layers=settings["n_gpu_layers"], n_ctx=settings["n_ctx"],
                        threads=usable_cores_(), max_threads=0, flash_attn="on",
                        backend_sampling="on", kv_cache="off"))
                else:
                    workbench.load_model(model, progress=False, kv_cache="off", **settings)
                fill_context(workbench.api.session(), settings["n_ctx"], m.n_vocab)
                used = gpu.used() - base
                sp = speed(model, settings, n_prompt, n_gen, m.n_vocab, load=False)
                split[who] = {"settings": settings, "loaded": True, "gpu_measured": used, **sp}
            except workbench.WorkbenchError as e:
                split[who] = {"settings": settings, "loaded": False, "error": e.message}
            print(f"  {who}: {split[who]}", file=sys.stderr)
    return {"gpu_free_mib": left // MiB, **split}


PARTS = ("memory", "budgets", "choice", "peer", "speed", "split")


def _earlier(name: str, result: dict[str, Any], parts: set[str]) -> dict[str, Any]:
    """The sections of an earlier run of the same model and mode that this run skips."""
    path = _provenance.RESULTS / f"{name}.json"
    if parts >= set(PARTS) or not path.exists():
        return {}
    old = json.loads(path.read_text())
    if old.get("model") != result["model"] or old.get("params") != result["params"]:
        return {}
    keep = {"memory": "memory", "budgets": "budgets", "choice": "choice", "peer": "peer",
            "speed": "speed", "split": "forced_split"}
    out = {keep[p]: old[keep[p]] for p in PARTS if p not in parts and keep[p] in old}
    # a synthetic model made again is another file of the same shape: say which it was
    out["kept_from"] = {"date": old.get("date"), "model_sha256": old.get("model_sha256"),
                        "machine": old.get("machine"), "sections": sorted(out)}
    return out


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The RESULT values, from whichever sections the results hold."""
    values: dict[str, Any] = {}
    mem = result.get("memory", [])
    if mem:
        values["mem_pred_err_max"] = max([abs(r["host_err"]) for r in mem]
                                         + [abs(r["gpu_err"]) for r in mem if "gpu_err" in r])
    if "choice" in result:
        values["auto_vs_best"] = result["choice"]["auto_vs_best"]
    if result.get("budgets"):
        values["capped_plans_within_cap"] = sum(1 for b in result["budgets"]
                                                if b.get("within_cap"))
        values["capped_plans"] = len(result["budgets"])
    if result.get("speed"):
        full = result["speed"][-1]
        values.update(gpu_full_tg=full["ours"]["tg_tps"], gpu_vs_llama_bench=full["tg_ratio"])
    split = result.get("forced_split")
    if split:
        values.update(forced_split_planner_loaded=split["planner"]["loaded"],
                      forced_split_naive_loaded=split["naive"]["loaded"])
        for rival in ("naive", "fit_params"):
            if split["planner"]["loaded"] and split[rival]["loaded"]:
                values[f"planner_vs_{rival}_split_tg"] = (split["planner"]["tg_tps"]
                                                         / split[rival]["tg_tps"])
    peer_ok = [r for r in result.get("peer", []) if "theirs_err" in r and "ours_err" in r]
    if peer_ok:
        values["ours_err_max"] = max(abs(r["ours_err"]) for r in peer_ok)
        values["fit_params_err_max"] = max(abs(r["theirs_err"]) for r in peer_ok)
        values["ours_vs_fit_params_tg"] = min(r["ours_tg_tps"] / r["theirs_tg_tps"]
                                              for r in peer_ok)
        # a configuration over the cap would not load on a GPU of that size
        fair = [r["ours_tg_tps"] / r["theirs_tg_tps"] for r in peer_ok
                if r.get("ours_within_cap") and r.get("theirs_within_cap")]
        if fair:
            values["ours_vs_fit_params_tg_both_within_cap"] = min(fair)
        values["ours_within_cap"] = sum(1 for r in result["peer"] if r.get("ours_within_cap"))
        values["fit_params_within_cap"] = sum(1 for r in result["peer"]
                                              if r.get("theirs_within_cap"))
        values["caps"] = len(result["peer"])
    return values


if __name__ == "__main__":
    main()
