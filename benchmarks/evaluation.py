"""Task accuracy through the engine, against lm-eval's own Hugging Face model.

1. Speed: one local multiple-choice task (wb_capitals, 116 questions x 4 choices) through
   the "workbench" lm-eval model and through lm-eval's `hf` model on the same GGUF file
   (transformers, dequantized to float32), both already loaded, same threads, side by
   side and alternating. eval_speed_vs_hf = hf seconds / ours.
2. Accuracy: the two accuracies and their difference, with the paired 95% interval of
   the difference (the same documents); acc_diff_vs_hf is |ours - hf|.
3. Agreement: the log-likelihood of every (context, choice) pair of wb_capitals and
   wb_docstrings, token by token, ours vs transformers on the same token ids: for the
   file as it is (Q4_1) and for its F16 copy (no 8-bit activation rounding).
4. Quality-targeted quantization: `quantize(MODEL, "int8", min_top1=0.98)`, checked
   against the model's F16 copy on held-out text (>= 16,000 tokens, Wilson interval), its size and decode
   speed vs plain Q8_0 (decode measured alternating, median of rounds).
5. Task accuracy of the default model's quantizations on the three local tasks, with
   95% intervals (the report's table).

    python benchmarks/evaluation.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _provenance  # noqa: E402


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a - b over the same documents, with its 95% normal interval."""
    d = [x - y for x, y in zip(a, b)]
    m = statistics.fmean(d)
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    half = 1.96 * sd / math.sqrt(len(d))
    return m, m - half, m + half


def per_doc(raw: dict, task: str, metric: str = "acc") -> list[float]:
    rows = sorted(raw["samples"][task], key=lambda s: s["doc_id"])
    return [float(s[metric]) for s in rows]


def merge(result: dict, keys: tuple[str, ...], values: dict, incomplete: bool = False) -> None:
    """A partial run's parts and RESULT values into the full run's file (its own machine
    and date recorded beside them)."""
    import json

    full = json.loads((_provenance.RESULTS / "evaluation.json").read_text())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    full.update({k: result[k] for k in keys})
    full.setdefault("partial_runs", []).append({"parts": list(keys), "date": stamp,
                                                "machine": result["machine"]})
    full["result"].update(values)
    full.pop("incomplete", None)
    for k in ("benchmark", "date", "thermal"):
        full.pop(k, None)
    if incomplete:
        full["incomplete"] = True
    _provenance.write("evaluation", full)
    print(_provenance.result_line(full["result"]))


def timed_eval(lm, task: dict, manager, limit: int | None) -> tuple[float, dict]:
    """One task through `lm`, timed; the task index is built once, outside the timing
    (lm-eval's default index reads every task file it ships: ~16 s here, for either)."""
    import lm_eval

    t0 = time.perf_counter()
    raw = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                                  bootstrap_iters=0, log_samples=True, random_seed=0)
    return time.perf_counter() - t0, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer documents, rounds, tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("speed", "quality", "tg"), default=None,
                    help="parts 1-2 (speed), 4-5 (quality), or part 4's decode speed of the "
                         "recorded mix (tg) only, merged into the results file of a full run")
    args = ap.parse_args()

    import os

    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    import torch
    from lm_eval.models.huggingface import HFLM

    import workbench
    from workbench.evaluation.lm import WorkbenchLM
    from workbench.evaluation.reference import agreement, hf_tokens
    from workbench.evaluation.tasks import DATA, local_task, read_docs
    from workbench.models.default import default_model_path
    from workbench.session import Session

    src = default_model_path()
    limit = 40 if args.quick else None
    rounds = 1 if args.quick else 3
    out = _provenance.scratch("wb-eval-")
    result = {"machine": _provenance.machine(), "model": src.name,
              "model_sha256": _provenance.sha256(src),
              "params": {"quick": args.quick, "threads": args.threads, "limit": limit,
                         "rounds": rounds, "task": "wb_capitals"}}
    result["llama_cpp_python"] = result["machine"].get("llama_cpp_python")

    if args.only == "tg":
        values = decode_ratio(result, src, out, args)
        merge(result, ("quality_target",), values)
        return
    if args.only == "quality":
        f16 = workbench.quantize(src, "F16", out / "f16.gguf", progress=False).path
        values = quality_target(result, src, f16, out, args)
        merge(result, ("quality_target",), values, incomplete=True)
        values.update(quantizations(result, src, f16, out, args))
        merge(result, ("quality_target", "quantizations"), values)
        return

    # 1-2: speed and accuracy, side by side
    torch.set_num_threads(args.threads)
    session = Session()
    session.load(src, progress=False, threads=args.threads, max_threads=0, n_ctx=2048)
    ours = WorkbenchLM(session=session)
    hf = HFLM(pretrained=str(src.parent), gguf_file=src.name, dtype="float32",
              device="cpu", batch_size=16)
    from lm_eval.tasks import TaskManager

    from lm_eval.models.dummy import DummyLM

    task, manager = local_task("wb_capitals"), TaskManager(include_defaults=False)
    ours_s, hf_s, fixed_s = [], [], []
    for r in range(rounds):
        s, raw_ours = timed_eval(ours, task, manager, limit)
        ours_s.append(s)
        s, raw_hf = timed_eval(hf, task, manager, limit)
        hf_s.append(s)
        # lm-eval's own work around a model (requests, metrics, its environment report):
        # the same for both, measured with its dummy model
        fixed_s.append(timed_eval(DummyLM(), task, manager, limit)[0])
        print(f"round {r + 1}: ours {ours_s[-1]:.1f} s, hf {hf_s[-1]:.1f} s, lm-eval's own "
              f"{fixed_s[-1]:.1f} s", file=sys.stderr)
    a_ours, a_hf = per_doc(raw_ours, "wb_capitals"), per_doc(raw_hf, "wb_capitals")
    diff, lo, hi = paired_interval(a_ours, a_hf)
    acc_ours, acc_hf = statistics.fmean(a_ours), statistics.fmean(a_hf)
    half = 1.96 * math.sqrt(acc_hf * (1 - acc_hf) / len(a_hf))
    result["speed"] = {"ours_s": ours_s, "hf_s": hf_s, "lm_eval_fixed_s": fixed_s,
                       "documents": len(a_ours), "pairs": 4 * len(a_ours),
                       "scored_tokens_per_run": ours.scored_tokens // rounds}
    result["accuracy"] = {"ours": acc_ours, "hf": acc_hf, "diff": diff, "diff_ci95": [lo, hi],
                          "acc_ci95_halfwidth": half,
                          "same_answer": statistics.fmean(x == y for x, y in zip(a_ours, a_hf))}
    del hf
    fixed = statistics.median(fixed_s)
    speed = {"eval_speed_vs_hf": statistics.median(hf_s) / statistics.median(ours_s),
             "model_speed_vs_hf": (statistics.median(hf_s) - fixed)
             / (statistics.median(ours_s) - fixed),
             "acc_ours": acc_ours, "acc_hf": acc_hf, "acc_diff_vs_hf": abs(diff),
             "acc_diff_ci95_lo": lo, "acc_diff_ci95_hi": hi,
             "acc_diff_within_ci": int(abs(acc_ours - acc_hf) <= half)}
    if args.only == "speed":
        session.close()
        merge(result, ("speed", "accuracy"), speed)
        return

    # 3: token-by-token agreement
    mc, _ = read_docs(DATA / "capitals.jsonl")
    cloze, _ = read_docs(DATA / "docstrings.jsonl")
    n_docs = 15 if args.quick else len(mc)
    pairs = [(f"Question: {d['question']}\nAnswer:", " " + c) for d in mc[:n_docs]
             for c in d["choices"]]
    pairs += [(d["context"], " " + d["target"]) for d in cloze[:n_docs]]
    toks = hf_tokens(src, pairs)
    agree = agreement(session.engine, src, toks, args.threads)
    f16 = workbench.quantize(src, "F16", out / "f16.gguf", progress=False).path
    s16 = Session()
    s16.load(f16, progress=False, threads=args.threads, max_threads=0, n_ctx=2048)
    agree16 = agreement(s16.engine, f16, toks, args.threads)
    s16.close()
    result["agreement"] = {"q4_1": agree.__dict__, "f16": agree16.__dict__}
    print(f"agreement Q4_1: {agree}\nagreement F16: {agree16}", file=sys.stderr)
    session.close()

    values = {**speed, "loglik_max_abs_diff": agree.max_abs_diff,
              "loglik_mean_abs_diff": agree.mean_abs_diff,
              "loglik_max_abs_diff_f16": agree16.max_abs_diff}
    _provenance.write("evaluation", {**result, "result": values, "incomplete": True})
    values.update(quality_target(result, src, f16, out, args))
    _provenance.write("evaluation", {**result, "result": values, "incomplete": True})
    values.update(quantizations(result, src, f16, out, args))
    result["result"] = values
    path = _provenance.write("evaluation", result)
    print(f"wrote {path}", file=sys.stderr)
    print(_provenance.result_line(values))


def quality_target(result: dict, src: Path, f16: Path, out: Path, args) -> dict:
    """4: the quantization held to a top-1 target, against plain Q8_0."""
    import workbench
    from workbench.compress.text import stdlib_text

    q8 = workbench.quantize(src, "Q8_0", out / "q8.gguf", progress=False)
    t0 = time.perf_counter()
    target = workbench.quantize(src, "int8", out / "target.gguf", min_top1=0.98, max_size=1.25,
                                threads=args.threads, progress=False)
    seconds = time.perf_counter() - t0
    chunks = 16 if args.quick else 64
    ev = workbench.evaluate([q8.path, target.path], reference=f16, text=stdlib_text(),
                            max_chunks=chunks, progress=False)
    from workbench.evaluation.results import wilson

    rows = {}
    for name, p in (("q8_0", q8.path), ("target", target.path)):
        r = ev.row(p)
        n = ev.tokens_scored
        rows[name] = {"bytes": r.bytes, "top1": r.top1, "kl_mean": r.kl_mean,
                      "top1_ci95": wilson(r.top1 * n, n), "perplexity": r.perplexity}
    tg = decode_speeds(q8.path, target.path, args)
    result["quality_target"] = {"rows": rows, "tokens": ev.tokens_scored, "tg_tps": tg,
                                "mix": target.overrides_text, "overrides": target.overrides,
                                "seconds": seconds,
                                "promoted": list(target.promoted),
                                "steps": [st.__dict__ for st in target.steps]}
    return {"qtarget_top1": rows["target"]["top1"],
            "qtarget_top1_lo": rows["target"]["top1_ci95"][0],
            "qtarget_top1_hi": rows["target"]["top1_ci95"][1],
            "qtarget_tokens": ev.tokens_scored, "qtarget_kl": rows["target"]["kl_mean"],
            "q8_top1": rows["q8_0"]["top1"],
            "qtarget_size_vs_q8": rows["target"]["bytes"] / rows["q8_0"]["bytes"],
            "qtarget_tg_vs_q8": statistics.median(tg["target"]) / statistics.median(tg["q8_0"])}


def decode_speeds(q8: Path, target: Path, args) -> dict:
    """Decode tokens/s of plain Q8_0 and the mix, alternating on one warm worker."""
    import workbench
    from workbench.compress.mixed import decode_speed

    session = workbench.api.session()
    tg: dict[str, list[float]] = {"q8_0": [], "target": []}
    settings = {"threads": args.threads, "max_threads": 0, "n_ctx": 1024}
    for _ in range(3 if args.quick else 7):
        for name, p in (("q8_0", q8), ("target", target)):
            tg[name].append(decode_speed(session, p, settings, n_gen=128)[0])
    return tg


def decode_ratio(result: dict, src: Path, out: Path, args) -> dict:
    """The recorded mix rebuilt from its overrides, its decode speed against Q8_0's."""
    import json

    import workbench

    full = json.loads((_provenance.RESULTS / "evaluation.json").read_text())
    qt = full["quality_target"]
    overrides = qt.get("overrides") or dict(
        item.rpartition("=")[::2] for item in qt["mix"].split(", "))
    q8 = workbench.quantize(src, "Q8_0", out / "q8.gguf", progress=False).path
    target = workbench.quantize(src, "Q8_0", out / "target.gguf", overrides=overrides,
                                progress=False)
    if target.bytes != qt["rows"]["target"]["bytes"]:
        raise SystemExit(f"the rebuilt mix has {target.bytes} bytes, the recorded one "
                         f"{qt['rows']['target']['bytes']}")
    tg = decode_speeds(q8, target.path, args)
    result["quality_target"] = {**qt, "tg_tps": tg, "overrides": overrides}
    return {"qtarget_tg_vs_q8": statistics.median(tg["target"]) / statistics.median(tg["q8_0"])}


def quantizations(result: dict, src: Path, f16: Path, out: Path, args) -> dict:
    """5: the default model's quantizations by task accuracy."""
    import workbench

    variants = [src, f16, out / "q8.gguf", out / "target.gguf"]
    variants.append(workbench.quantize(f16, "Q4_K_M", out / "q4km.gguf", progress=False).path)
    variants.append(workbench.quantize(f16, "Q2_K", out / "q2k.gguf", progress=False).path)
    ev = workbench.compare(variants, f16, tasks="wb_capitals,wb_docstrings,wb_pasttense",
                           limit=40 if args.quick else None, max_chunks=8, progress=False)
    table = []
    for r in ev.rows:
        table.append({"model": r.path.name, "quant": r.quantization,
                      "MiB": round(r.bytes / 2**20, 1), "tg_tps": round(r.tg_tps, 1),
                      "kl_mean": r.kl_mean, "top1": r.top1,
                      **{f"{t}": f"{a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}]"
                         for t, a in r.tasks.items()}})
    result["quantizations"] = table
    best = ev.row(src).tasks["wb_capitals"][0]
    return {"capitals_acc_q4_1": best}


if __name__ == "__main__":
    main()
