"""Power-, heat- and precision-aware placement: a power cap, and mixed precision across
a split, measured side by side.

Two parts.

  mixed   A model that must be split (GPU memory capped with gpu_mem_mib). Uniform
          quantizations and placement-aware mixes (the planner's CPU layers at fewer
          bits, the GPU's at more) are each placed by the planner and decoded,
          alternating. Each mix is compared with the uniform quantization nearest to
          it in size: decode speed (here), and KL divergence against the reference.
  power   A cap at CAP_FRACTION of the uncapped draw. The planner's choice (autotune's
          candidates, power_cap=) is run again with its power sampled every 50 ms: the
          share of samples (250 ms windows, from the second after the start, when NVML's
          one-second mean has let go of the idle before) over the cap, and its speed
          against the best configuration under the cap found by an exhaustive sweep (GPU
          layers x threads x micro-batch).

Speed and power need the GPU machine, where the default model's file does not travel:
`--gpu` measures them on a synthetic model of a real shape (random weights decode as
fast as trained ones). Quality needs trained weights: the run without --gpu (this
machine) builds the same mixes from the default model, with the same share of layers
on the CPU, and measures their KL divergence and top-1 agreement against its F16 copy.
Each run quotes the other's committed numbers in its RESULT line.

    python benchmarks/power_precision.py [--quick]                  # quality (CPU)
    python benchmarks/power_precision.py --gpu [--parts mixed,power] # speed, power (GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _provenance  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
MiB = 2 ** 20
UNIFORM = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
PAIRS = (("Q8_0", "Q4_0"), ("Q6_K", "Q4_0"), ("Q8_0", "Q3_K"), ("Q6_K", "Q4_K"))
CAP_FRACTION = 0.6


def _load(name: str) -> dict[str, Any]:
    path = _provenance.RESULTS / f"{name}.json"
    if not path.exists():
        path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def same_size(variants: list[dict[str, Any]], mix: dict[str, Any]) -> dict[str, Any]:
    return min((v for v in variants if v["kind"] == "uniform"),
               key=lambda v: abs(v["bytes"] - mix["bytes"]))


# ---- mixed precision: speed of a split (GPU) -----------------------------------------

def mixed_speed(shape: str, vocab: str | None, gpu_mem_mib: int | None, rounds: int,
                save: Any) -> dict[str, Any]:
    import workbench
    from workbench.compress.mixed import build_mix, cpu_bytes, decode_speed
    from workbench.models.inspect import inspect_model
    from workbench.models.synthetic import synthetic

    CACHE.mkdir(parents=True, exist_ok=True)
    f16 = CACHE / f"synthetic-{shape}.F16.gguf"
    t = time.monotonic()
    if not f16.exists():
        synthetic(shape, "f16", f16, tokenizer_from=vocab)
    out: dict[str, Any] = {"model": f16.name, "model_sha256": _provenance.sha256(f16),
                           "synthetic_s": round(time.monotonic() - t, 1)}
    paths: dict[str, Path] = {}
    for q in UNIFORM:
        p = CACHE / f"synthetic-{shape}.{q}.gguf"
        if not p.exists():
            workbench.quantize(f16, q, p, progress=False)
        paths[q] = p
    if gpu_mem_mib is None:  # about half of the middle quantization's layers fit
        m = inspect_model(paths["Q5_K_M"])
        gpu_mem_mib = int((sum(m.layer_bytes) / 2 + m.output_offload_bytes) / MiB) + 700
    settings = {"gpu_mem_mib": gpu_mem_mib, "n_ctx": 2048}
    out["settings"] = settings
    n = inspect_model(f16).n_layers
    variants = [{"name": q, "kind": "uniform", "path": p} for q, p in paths.items()]
    for gpu, cpu in PAIRS:
        t = time.monotonic()
        mix = build_mix(workbench.api.session(), f16, gpu, cpu, out=CACHE / f"synthetic-{shape}.{gpu}-gpu.{cpu}-cpu.gguf",
                        overwrite=True, settings=settings)
        variants.append({"name": f"{gpu} GPU / {cpu} CPU", "kind": "mixed", "path": mix.path,
                         "gpu_type": gpu, "cpu_type": cpu, "cpu_layers": mix.cpu_layers,
                         "build_s": round(time.monotonic() - t, 1)})
    for v in variants:
        v["bytes"] = v["path"].stat().st_size
        v["tg"] = []
    for _ in range(rounds):  # alternating, so the machine's slow moments spread out
        for v in variants:
            tps, ngl = decode_speed(workbench.api.session(), v["path"], settings, n_gen=128)
            v["tg"].append(round(tps, 2))
            v["n_gpu_layers"] = ngl
    for v in variants:
        v["tg_tps"] = max(v["tg"])
        v["cpu_layers"] = n - min(v["n_gpu_layers"], n)
        v["cpu_bytes"] = cpu_bytes(v["path"], v["n_gpu_layers"])
        v["path"] = v["path"].name
    out["n_layers"] = n
    out["variants"] = variants
    for v in variants:
        if v["kind"] == "mixed":
            u = same_size(variants, v)
            v["vs_uniform"] = {"uniform": u["name"], "size_ratio": round(v["bytes"] / u["bytes"], 3),
                               "tg_ratio": round(v["tg_tps"] / u["tg_tps"], 3),
                               "cpu_bytes_ratio": round(v["cpu_bytes"] / u["cpu_bytes"], 3)
                               if u["cpu_bytes"] else None}
    save(out)
    return out


# ---- mixed precision: quality (CPU, trained weights) ---------------------------------

def mixed_quality(gpu_run: dict[str, Any], quick: bool) -> dict[str, Any]:
    import workbench
    from workbench.compress.mixed import build_mix
    from workbench.compress.quantize import default_output
    from workbench.models.default import default_model_path
    from workbench.models.inspect import inspect_model

    src = default_model_path()
    n = inspect_model(src).n_layers
    ref = default_output(src, "F16")
    if not ref.exists():
        workbench.quantize(src, "F16", ref, progress=False)
    variants = gpu_run.get("variants") or [
        {"name": q, "kind": "uniform"} for q in UNIFORM] + [
        {"name": f"{g} GPU / {c} CPU", "kind": "mixed", "gpu_type": g, "cpu_type": c,
         "cpu_layers": 8, "n_layers": 16} for g, c in PAIRS]
    gpu_layers = gpu_run.get("n_layers") or 16
    rows = []
    folder = ref.parent / "power-precision"
    folder.mkdir(exist_ok=True)
    for v in variants:
        if v["kind"] == "uniform":
            path = folder / f"{src.stem}.{v['name']}.gguf"
            if not path.exists():
                workbench.quantize(src, v["name"], path, progress=False)
            rows.append({"name": v["name"], "kind": "uniform", "path": path})
        else:
            # the same share of layers on the CPU as in the GPU run's split
            k = round(v["cpu_layers"] / gpu_layers * n)
            mix = build_mix(workbench.api.session(), src, v["gpu_type"], v["cpu_type"], n_gpu_layers=n - k,
                            out=folder / f"{src.stem}.{v['gpu_type']}-gpu.{v['cpu_type']}-cpu.k{k}"
                                         ".gguf", overwrite=True)
            rows.append({"name": v["name"], "kind": "mixed", "path": mix.path, "cpu_layers": k})
    ev = workbench.evaluate([r["path"] for r in rows], reference=ref,
                            max_chunks=4 if quick else 8)
    for r in rows:
        q = ev.row(r["path"])
        r.update(bytes=r["path"].stat().st_size, kl=q.kl_mean, top1=q.top1,
                 perplexity=q.perplexity, path=r["path"].name)
    for r in rows:
        if r["kind"] == "mixed":
            g = next((v for v in variants if v["name"] == r["name"]), {})
            name = (g.get("vs_uniform") or {}).get("uniform") or same_size(rows, r)["name"]
            u = next(x for x in rows if x["name"] == name)
            r["vs_uniform"] = {"uniform": name, "kl_ratio": round(r["kl"] / u["kl"], 3),
                               "size_ratio": round(r["bytes"] / u["bytes"], 3)}
    return {"model": src.name, "model_sha256": _provenance.sha256(src), "reference": ref.name,
            "tokens_scored": ev.tokens_scored, "n_layers": n, "variants": rows}


# ---- power cap (GPU) -----------------------------------------------------------------

def _run_sampled(path: Path, settings: dict[str, Any], n_gen: int, seconds: float = 4.0,
                 n_prompt: int = 128) -> tuple[float, list[float], float | None, list[list[float]]]:
    """Load with `settings`, then generate for at least `seconds` (NVML averages power over
    about one) with power sampled every 50 ms: (median decode tokens/s, the samples in
    watts, joules per generated token, the trace: [seconds since the start, board W (NVML's
    one-second mean), W from the energy counter over the last 250 ms, GPU °C, SM MHz,
    tokens generated so far])."""
    import workbench
    from workbench.power.meter import Sampler

    workbench.load_model(path, progress=False, kv_cache="off", **settings)
    prompt = [1000 + (i * 7919) % 30000 for i in range(n_prompt)]
    s = Sampler(0.05).start()
    t0, tps, tokens, done = time.monotonic(), [], 0, []
    while not tps or time.monotonic() - t0 < seconds:
        c = workbench.generate(prompt, max_tokens=n_gen, temperature=0.0, ignore_eos=True)
        tps.append(c.metrics.decode_tps)
        tokens += c.metrics.generated_tokens
        done.append((time.monotonic(), tokens))
    r = s.stop()
    trace, rs = [], s.readings
    for i, x in enumerate(rs):
        g = x.gpus[0] if x.gpus else None
        if g is None:
            break
        j = max((k for k in range(i) if x.t - rs[k].t >= 0.25), default=None)
        ew = None
        if j is not None and g.energy_j is not None and rs[j].gpus[0].energy_j is not None:
            ew = round((g.energy_j - rs[j].gpus[0].energy_j) / (x.t - rs[j].t), 1)
        trace.append([round(x.t - rs[0].t, 3), g.power_w, ew, g.temperature_c,
                      g.sm_clock_mhz, max((n for tt, n in done if tt <= x.t), default=0)])
    return statistics.median(tps), r.watts, r.joules_per_token(tokens), trace


def power_cap(shape: str, vocab: str | None, quick: bool, save: Any) -> dict[str, Any]:
    import workbench
    from workbench.power import cap, meter
    from workbench.models.inspect import inspect_model
    from workbench.models.synthetic import synthetic

    CACHE.mkdir(parents=True, exist_ok=True)
    model = CACHE / f"synthetic-{shape}.Q4_0.gguf"
    if not model.exists():
        synthetic(shape, "q4_0", model, tokenizer_from=vocab)
    out: dict[str, Any] = {"model": model.name, "model_sha256": _provenance.sha256(model)}
    tel = meter.Telemetry()
    out["sources"], out["missing"] = tel.power_sources(), tel.missing
    tel.close()
    try:
        out["idle_w"] = round(cap.idle_power(seconds=3.0), 1)
    except workbench.WorkbenchError as e:
        out["error"] = str(e)
        save(out)
        return out
    n = inspect_model(model).n_layers
    tps, watts, jpt, _trace = _run_sampled(model, {}, 256)
    out["uncapped"] = {"tg_tps": round(tps, 1), "mean_w": round(statistics.fmean(watts), 1),
                       "p95_w": round(sorted(watts)[int(0.95 * (len(watts) - 1))], 1),
                       "joules_per_token": jpt}
    cap = round(CAP_FRACTION * out["uncapped"]["mean_w"], 1)
    out["cap_w"] = cap
    if cap <= out["idle_w"]:
        # The whole board's draw under this workload is close to its idle draw: 60% of it
        # is a cap nothing meets. Cap 60% of the way from idle to the uncapped draw instead.
        out["cap_below_idle"] = (f"{CAP_FRACTION:.0%} of the uncapped {out['uncapped']['mean_w']}"
                                 f" W is {cap} W, below the idle draw of {out['idle_w']} W")
        cap = round(out["idle_w"] + CAP_FRACTION * (out["uncapped"]["mean_w"] - out["idle_w"]), 1)
        out["cap_w"] = cap
    save(out)
    tune = {"repeats": 1, "n_prompt": 64, "n_gen": 32, "progress": False}
    t = time.monotonic()
    try:
        planner = workbench.autotune(model, power_cap=cap, **tune)
    except workbench.WorkbenchError as e:
        out["planner_error"] = str(e)
        save(out)
        return out
    out["planner"] = {"seconds": round(time.monotonic() - t, 1), "rows": planner.rows,
                      "best": planner.best}
    save(out)
    from workbench.device.profile import usable_cores

    cores = usable_cores()
    threads = sorted({max(1, cores // 2), cores})
    # every step near the top, where the draw crosses the cap; coarser below, where the CPU
    # layers set a slow pace at little more than the idle draw (--quick: fewer of those)
    top = [n + 1, n, n - 1, n - 2, n - 3, n - 5, n - 9] + ([] if quick else [n - 7, n - 13])
    layers = sorted({x for x in top if x >= 0} | {0, n // 2} | (set() if quick else {n // 4}))
    t = time.monotonic()
    sweep = workbench.autotune(model, power_cap=cap, threads=threads, n_gpu_layers=layers,
                               **tune)
    out["sweep"] = {"seconds": round(time.monotonic() - t, 1), "configurations": len(sweep.rows),
                    "rows": sweep.rows, "best": sweep.best}
    save(out)

    def config(b: dict[str, Any]) -> dict[str, Any]:
        return {"n_gpu_layers": b["n_gpu_layers"], "threads": b["threads"],
                "n_ubatch": b["n_ubatch"], "n_batch": max(512, b["n_ubatch"] or 512)}

    chosen = workbench.plan(model, power_cap=cap).settings  # what %load_model --power-cap does
    out["plan_choice"] = {k: chosen[k] for k in ("n_gpu_layers", "threads", "n_ubatch")}
    runs: dict[str, dict[str, list[float]]] = {"planner": {"tg": [], "w": []},
                                               "best": {"tg": [], "w": []}}
    traces: dict[str, list[Any]] = {"planner": [], "best": [], "planner_short_requests": []}
    for _ in range(2 if quick else 3):
        for name, b in (("planner", planner.best), ("best", sweep.best)):
            tg, w, _j, trace = _run_sampled(model, config(b), 192)
            runs[name]["tg"].append(tg)
            runs[name]["w"] += w
            traces[name].append(trace)
    # the choice again under short requests (autotune's speed runs): the gaps between them
    # leave the GPU idle, and the draw lower than under the long answers checked above
    short_w: list[float] = []
    for _ in range(2):
        _tg, w, _j, trace = _run_sampled(model, config(planner.best), tune["n_gen"],
                                         n_prompt=tune["n_prompt"])
        short_w += w
        traces["planner_short_requests"].append(trace)
    out["check_traces"] = traces
    over = sum(1 for w in runs["planner"]["w"] if w > cap)
    out["check"] = {
        "samples": len(runs["planner"]["w"]), "over_cap": over,
        "violation_frac": round(over / max(1, len(runs["planner"]["w"])), 4),
        "planner_tg": [round(x, 1) for x in runs["planner"]["tg"]],
        "best_tg": [round(x, 1) for x in runs["best"]["tg"]],
        "capped_vs_best": round(statistics.median(runs["planner"]["tg"])
                                / statistics.median(runs["best"]["tg"]), 3),
        "planner_w": [round(x, 1) for x in runs["planner"]["w"]],
        "planner_short_requests_w": [round(x, 1) for x in short_w],
        "short_requests_over_cap": sum(1 for x in short_w if x > cap)}
    save(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, a coarser sweep")
    ap.add_argument("--gpu", action="store_true", help="the speed and power parts (GPU machine)")
    ap.add_argument("--parts", default="mixed,power", help="with --gpu: mixed, power or both")
    ap.add_argument("--synthetic", default="llama-2-7b", help="model shape of the power part")
    ap.add_argument("--mixed-shape", default="smollm2-135m",
                    help="model shape of the mixed part: the default model's, so that its "
                         "tensor types (and llama.cpp's fallbacks for rows not a multiple of "
                         "256) and its layers are those the quality part measures")
    ap.add_argument("--vocab", default=None, help="GGUF whose tokenizer the synthetic model "
                    "copies (default: the default model)")
    ap.add_argument("--summary", action="store_true",
                    help="print the RESULT line of the results on record; run nothing")
    ap.add_argument("--gpu-mem-mib", type=int, default=None,
                    help="GPU memory the planner may use in the mixed part (default: about "
                         "half the layers fit)")
    args = ap.parse_args()
    if args.summary:
        print(_provenance.result_line(summary(_load("power_precision_gpu"),
                                              _load("power_precision"))))
        return
    machine = _provenance.machine()
    name = "power_precision_gpu" if args.gpu else "power_precision"
    result: dict[str, Any] = {"machine": machine,
                              "params": {"quick": args.quick, "shape": args.synthetic,
                                         "mixed_shape": args.mixed_shape,
                                         "cap_fraction": CAP_FRACTION, "uniform": UNIFORM,
                                         "pairs": PAIRS}}
    if args.gpu:
        result.update({k: v for k, v in _load(name).items()
                       if k.startswith(("mixed", "power"))})  # parts not run now are kept

    def save(part: str) -> Any:
        def write(data: dict[str, Any]) -> None:
            result[part] = data
            _provenance.write(name, result)
        return write

    if args.gpu:
        parts = set(args.parts.split(","))
        if "mixed" in parts:
            mixed_speed(args.mixed_shape, args.vocab, args.gpu_mem_mib, 2 if args.quick else 3,
                        save("mixed"))
        if "power" in parts:
            power_cap(args.synthetic, args.vocab, args.quick, save("power"))
        gpu, cpu = result, _load("power_precision")
    else:
        gpu = _load("power_precision_gpu")
        t = time.monotonic()
        save("quality")(mixed_quality(gpu.get("mixed") or {}, args.quick))
        result["quality"]["seconds"] = round(time.monotonic() - t, 1)
        # and this machine's answer to a power cap
        import workbench
        try:
            workbench.plan(power_cap=30)
            result["power_here"] = "power readings available"
        except workbench.WorkbenchError as e:
            result["power_here"] = e.message
        _provenance.write(name, result)
        cpu = result
    result["result"] = summary(gpu, cpu)
    _provenance.write(name, result)
    print(f"wrote {_provenance.RESULTS / name}.json", file=sys.stderr)
    print(_provenance.result_line(result["result"]))


def summary(gpu: dict[str, Any], cpu: dict[str, Any]) -> dict[str, Any]:
    """Each mix against the uniform quantization of its size: decode speed (GPU run) and
    KL divergence (CPU run). The mix reported is the fastest of those at equal quality
    (KL at most 1.1x the uniform's), else the fastest; `cpu_bytes` says why a mix of the
    same size cannot decode much faster: the GPU holds as many bytes either way."""
    mixes = [v for v in (gpu.get("mixed") or {}).get("variants", []) if v["kind"] == "mixed"]
    quality = {v["name"]: v for v in (cpu.get("quality") or {}).get("variants", [])}
    out: dict[str, Any] = {"mixed_vs_uniform_tg": "n/a", "mixed_kl_ratio": "n/a"}
    rows = []
    for m in mixes:
        q = (quality.get(m["name"]) or {}).get("vs_uniform") or {}
        rows.append((m, q.get("kl_ratio")))
    if rows:
        equal = [r for r in rows if r[1] is not None and r[1] <= 1.1]
        m, kl = max(equal or rows, key=lambda r: r[0]["vs_uniform"]["tg_ratio"])
        out.update(mixed_vs_uniform_tg=m["vs_uniform"]["tg_ratio"],
                   mixed_kl_ratio=kl if kl is not None else "n/a",
                   mix=m["name"].replace(" ", ""), uniform=m["vs_uniform"]["uniform"],
                   cpu_bytes=m["vs_uniform"]["cpu_bytes_ratio"])
    check = (gpu.get("power") or {}).get("check") or {}
    out["cap_violation_frac"] = check.get("violation_frac", "n/a")
    out["capped_vs_best"] = check.get("capped_vs_best", "n/a")
    return out


if __name__ == "__main__":
    main()
