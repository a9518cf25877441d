"""Compression: what int8, int4 and a pruned model cost in quality, and what they save.

On the default model (SmolLM2-135M-Instruct, itself Q4_1):
1. Quality. Each variant's perplexity, KL divergence and top-1 agreement against the
   reference, on the same tokens of Python standard library docstrings. The reference is
   the default model's F16 copy (dequantized Q4_1): the deltas measure requantization
   loss, as llama.cpp's own KL tables measure quantization loss against F16.
2. Quantizer speed. `workbench.quantize` (llama_model_quantize in a child process)
   against llama.cpp's `llama-quantize` on the same file, Q8_0, alternating, medians.
3. Pruning. Two of the 30 layers, chosen by angular distance, removed; and a quarter of
   every layer's FFN channels, the least active, removed: what each costs.
   Q8_0 is then scored again, with the source beside it, on Q8_CHUNKS chunks: its top-1
   agreement sits within a fraction of a point of the 97% target, where 16 chunks (4,080
   tokens) leave a standard error of 0.3 points. The source model holds the reference's
   own weights, so its agreement is the floor that the CPU's arithmetic sets (its
   activations are rounded to 8 bits in each product, the reference's to 16).
4. Distillation. The F16 reference with the same two layers removed, trained toward the
   full F16 reference (KL on calibration text, disjoint from the evaluation text), the
   layers from three before the gap on: how much of the perplexity lost to pruning it
   wins back, in F16 and once quantized back to Q4_1 (against the pruned Q4_1 file, whose
   weights are the source's own, so that ratio also pays the requantization).

Usage: python benchmarks/compression.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _native  # noqa: E402
import _provenance  # noqa: E402


DISTILL_STEPS, DISTILL_LR, DISTILL_BEFORE_GAP = 300, 5e-4, 3
Q8_CHUNKS = 64   # 16,320 tokens scored: a standard error of about 0.14 points at 97%


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a share `p` of `n` trials (the tokens taken as independent)."""
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return mid - half, mid + half


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer chunks and repetitions")
    args = ap.parse_args()

    import workbench
    from workbench.compress.text import stdlib_text, text_sha256
    from workbench.device.profile import usable_cores
    from workbench.models.default import default_model_path

    src = default_model_path()
    chunks, reps = (4, 3) if args.quick else (16, 5)
    threads = usable_cores()
    out = _provenance.scratch("wb-compress-")
    text = stdlib_text()
    result = {"machine": _provenance.machine(), "model": src.name,
              "model_sha256": _provenance.sha256(src),
              "params": {"quick": args.quick, "n_ctx": 512, "max_chunks": chunks,
                         "threads": threads, "text": "Python standard library docstrings",
                         "python": sys.version.split()[0], "text_sha256": text_sha256(text),
                         "quantize_repetitions": reps}}

    # 1. quality
    print("quality: variants against the F16 reference", file=sys.stderr)
    ref = workbench.quantize(src, "f16", out / "ref.F16.gguf", progress=False)
    variants = {q: workbench.quantize(src, q, out / f"m.{q}.gguf", progress=False)
                for q in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q2_K")}
    pruned = workbench.prune(src, layers=2, out=out / "m-pruned2.Q4_1.gguf", progress=False)
    ffn = workbench.prune(src, ffn_keep=0.75, out=out / "m-ffn1152.Q4_1.gguf", progress=False)
    ev = workbench.evaluate([src, *variants.values(), pruned, ffn], reference=ref,
                            max_chunks=chunks, progress=False, text=text)
    print(repr(ev), file=sys.stderr)
    rows = []
    for r in ev.rows:
        rows.append({"file": r.path.name, "quant": r.quantization, "bytes": r.bytes,
                     "perplexity": r.perplexity, "kl_mean": r.kl_mean, "kl_p99": r.kl_p99,
                     "top1": r.top1, "load_s": r.load_s, "pp_tps": r.pp_tps,
                     "tg_tps": r.tg_tps})
    result["quality"] = {"tokens_scored": ev.tokens_scored, "chunks": ev.chunks,
                         "note": ev.note, "rows": rows,
                         "pareto_kl": [r.path.name for r in ev.pareto("kl_mean")]}
    result["pruning"] = {"layers_removed": list(pruned.pruned_layers),
                         "angular_distance": list(pruned.ranking.distances),
                         "perplexity_before": ev.row(src).perplexity,
                         "perplexity_after": ev.row(pruned.path).perplexity,
                         "ffn_keep": 0.75,
                         "ffn_perplexity_after": ev.row(ffn.path).perplexity,
                         "distilled": None}
    _provenance.write("compression", {**result, "incomplete": True})

    # 1b. Q8_0 against its target, on enough tokens to tell
    q8_chunks = chunks if args.quick else Q8_CHUNKS
    print(f"precision: Q8_0 and the source on {q8_chunks} chunks", file=sys.stderr)
    ev8 = ev if q8_chunks == chunks else workbench.evaluate(
        [src, variants["Q8_0"].path], reference=ref, max_chunks=q8_chunks, progress=False,
        text=text)
    print(repr(ev8), file=sys.stderr)
    q8_long, floor = ev8.row(variants["Q8_0"].path), ev8.row(src)
    result["q8_precision"] = {
        "tokens_scored": ev8.tokens_scored, "chunks": ev8.chunks,
        "q8_0": {"kl_mean": q8_long.kl_mean, "kl_p99": q8_long.kl_p99, "top1": q8_long.top1,
                 "top1_ci95": wilson(q8_long.top1, ev8.tokens_scored)},
        "source": {"kl_mean": floor.kl_mean, "top1": floor.top1,
                   "top1_ci95": wilson(floor.top1, ev8.tokens_scored)}}
    _provenance.write("compression", {**result, "incomplete": True})

    # 4. distillation of the pruned model, evaluated on the same tokens
    steps = DISTILL_STEPS // 4 if args.quick else DISTILL_STEPS
    train_from = max(0, min(pruned.pruned_layers) - DISTILL_BEFORE_GAP)
    print(f"distillation: {steps} steps from layer {train_from}", file=sys.stderr)
    pruned16 = workbench.prune(ref, layers=list(pruned.pruned_layers),
                               out=out / "ref-pruned2.F16.gguf", progress=False)
    healed = workbench.distill(pruned16, ref, steps=steps, lr=DISTILL_LR, seq_len=256,
                               train_from=train_from, out=out / "ref-pruned2-distilled.F16.gguf",
                               progress=False)
    healed_q = workbench.quantize(healed.path, "Q4_1", out / "m-pruned2-distilled.Q4_1.gguf",
                                  progress=False)
    ev2 = workbench.evaluate([src, pruned16, healed.path, pruned, healed_q], reference=ref,
                             max_chunks=chunks, progress=False, text=text)
    print(repr(ev2), file=sys.stderr)
    p_ref, p_pruned, p_healed, p_src, p_pruned_q, p_healed_q = (
        ev2.row(x).perplexity for x in (ref.path, pruned16.path, healed.path, src, pruned.path,
                                        healed_q.path))
    recovered = (p_pruned - p_healed) / (p_pruned - p_ref)
    recovered_q = (p_pruned_q - p_healed_q) / (p_pruned_q - p_src)
    result["pruning"]["distilled"] = {"steps": steps, "lr": DISTILL_LR, "seq_len": 256,
                                      "train_from": train_from, "type": "F16",
                                      "seconds": healed.seconds, "losses": healed.losses,
                                      "perplexity_full": p_ref, "perplexity_pruned": p_pruned,
                                      "perplexity": p_healed, "recovered": recovered,
                                      "kl_mean": ev2.row(healed.path).kl_mean,
                                      "q4_1": {"perplexity_full": p_src,
                                               "perplexity_pruned": p_pruned_q,
                                               "perplexity": p_healed_q,
                                               "recovered": recovered_q}}
    _provenance.write("compression", {**result, "incomplete": True})

    # 2. quantizer speed, side by side with llama-quantize on the same file
    print("speed: workbench.quantize against llama-quantize, Q8_0", file=sys.stderr)
    native = _native.build_tool("llama-quantize")
    ours_s, theirs_s = [], []
    for i in range(reps):
        t0 = time.perf_counter()
        workbench.quantize(src, "q8_0", out / "ours.gguf", overwrite=True, progress=False)
        ours_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run([str(native), "--allow-requantize", str(src), str(out / "theirs.gguf"),
                        "Q8_0", str(threads)], check=True, capture_output=True)
        theirs_s.append(time.perf_counter() - t0)
        print(f"  round {i + 1}: ours {ours_s[-1]:.2f} s, llama-quantize {theirs_s[-1]:.2f} s",
              file=sys.stderr)
    same = (out / "ours.gguf").read_bytes() == (out / "theirs.gguf").read_bytes()
    result["quantize_speed"] = {"ours_s": ours_s, "llama_quantize_s": theirs_s,
                                "identical_output": same}

    q4 = ev.row(variants["Q4_K_M"].path)
    lo, hi = result["q8_precision"]["q8_0"]["top1_ci95"]
    values = {"q8_kl": q8_long.kl_mean, "q8_top1": q8_long.top1, "q8_top1_lo": lo,
              "q8_top1_hi": hi, "q8_tokens": ev8.tokens_scored, "q4km_kl": q4.kl_mean,
              "q4km_top1": q4.top1,
              "prune2_ppl_ratio": ev.row(pruned.path).perplexity / ev.row(src).perplexity,
              "ffn75_ppl_ratio": ev.row(ffn.path).perplexity / ev.row(src).perplexity,
              "prune_recovered": recovered, "prune_recovered_q4_1": recovered_q,
              "q8_top1_floor": floor.top1,
              "quantize_time_vs_native": statistics.median(ours_s) / statistics.median(theirs_s),
              "same_bytes_as_native": same}
    result["result"] = values
    path = _provenance.write("compression", result)
    print(f"wrote {path}", file=sys.stderr)
    print(_provenance.result_line(values))


if __name__ == "__main__":
    main()
