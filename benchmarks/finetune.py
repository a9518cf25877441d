"""Fine-tuning: training throughput, the checkpoint stall, and the effect on a task.

On the default model (SmolLM2-135M-Instruct), through `workbench.finetune` (the
training process, as a user runs it):
1. Effect and throughput. LoRA on notebook 04's task (notebooks/data/workbench-help.jsonl,
   the notebook's settings): validation loss before and after, and training tokens/s
   (every token of each batch, forward and backward; the median step).
2. Checkpoint stall. The seconds the training loop is blocked per checkpoint, with the
   asynchronous double-buffered writer and with synchronous saving, in runs that
   alternate (async, sync, async, sync), a checkpoint after every step; medians.
3. QLoRA beside LoRA (--qlora; a CUDA GPU and bitsandbytes). The task of 1 on the GPU,
   LoRA (the bf16 base) then QLoRA (the base's linear weights in bitsandbytes' 4-bit NF4),
   in one run: tokens/s, the GPU memory once loaded and at its peak
   (torch.cuda.max_memory_allocated, the training process's), validation loss before
   and after, and what 4 bits save. It alone runs, and it goes into results/NAME.json as
   its "qlora" entry: what the file held (an earlier run's parts 1 and 2) is kept.

Usage: python benchmarks/finetune.py [--quick] [--device cpu|cuda] [--base GGUF]
       [--name RESULT_NAME] [--qlora]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _provenance  # noqa: E402

DATA = ROOT / "notebooks" / "data" / "workbench-help.jsonl"
# notebook 04's settings
TASK = dict(epochs=3, batch_size=4, rank=8, lr=5e-4, max_len=256, eval_every=10,
            ckpt_every=20)
METHODS = ("lora", "qlora")  # part 3, in this order
MEMORY_NOTE = (
    "loaded_memory: the base and the adapter on the GPU before training "
    "(torch.cuda.memory_allocated); peak_memory: torch.cuda.max_memory_allocated over the "
    "run, activations and logits included. QLoRA holds the linear weights in 4-bit NF4, but "
    "peft's prepare_model_for_kbit_training keeps the weights left unquantized (embeddings, "
    "norms) in float32, and so the hidden states between its layers, where LoRA's are bf16.")


def versions() -> dict[str, str]:
    """The training stack's versions; bitsandbytes where it is installed (QLoRA)."""
    import importlib.metadata as md

    out = {p: md.version(p) for p in ("torch", "transformers", "peft", "safetensors")}
    try:
        out["bitsandbytes"] = md.version("bitsandbytes")
    except md.PackageNotFoundError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one epoch, fewer stall rounds")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--base", default=None, help="the base GGUF (default: the default model)")
    ap.add_argument("--name", default="finetune", help="results/NAME.json")
    ap.add_argument("--qlora", action="store_true",
                    help="only QLoRA beside LoRA on the GPU, added to results/NAME.json")
    args = ap.parse_args()

    import workbench

    base = workbench.api.resolve_model(args.base)
    out = _provenance.scratch("wb-finetune-")
    if args.qlora:
        qlora_beside_lora(base, out, args)
        return
    task = {**TASK, "epochs": 1 if args.quick else TASK["epochs"], "device": args.device}
    result = {"machine": _provenance.machine(), "versions": versions(), "model": base.name,
              "model_sha256": _provenance.sha256(base),
              "params": {"quick": args.quick, "data": DATA.name,
                         "data_sha256": _provenance.sha256(DATA), "task": task}}

    # 1. the task: effect and throughput
    print(f"training on {DATA.name}: {task}", file=sys.stderr)
    run = workbench.finetune(base, DATA, out=out / "task", **task).wait()
    print(repr(run), file=sys.stderr)
    rates = [s["tokens"] / s["seconds"] for s in _steps(run)]
    result["task"] = {"steps": run.steps, "val_loss_before": run.val_loss_before,
                      "val_loss_after": run.val_loss_after, "val_loss_drop": run.val_loss_drop,
                      "train_tok_s_median": statistics.median(rates),
                      "train_tok_s_mean": run.tokens_per_s, "history": run.history}
    _provenance.write(args.name, {**result, "incomplete": True})

    # 2. the checkpoint stall, async and sync alternating
    rounds = 1 if args.quick else 2
    stalls: dict[str, list[float]] = {"async": [], "sync": []}
    for r in range(rounds):
        for mode in ("async", "sync"):
            res = workbench.finetune(base, DATA, out=out / f"{mode}{r}", steps=12, ckpt_every=1,
                                     keep=2, async_checkpoints=mode == "async",
                                     **{k: v for k, v in task.items()
                                        if k not in ("epochs", "ckpt_every")}).wait()
            stalls[mode] += res.checkpoint_stalls_s[1:-1]  # not the first (allocates) or last
            print(f"  round {r + 1} {mode}: median stall "
                  f"{statistics.median(res.checkpoint_stalls_s[1:-1]) * 1e3:.1f} ms",
                  file=sys.stderr)
    size = max(p.stat().st_size for p in (out / "sync0" / "checkpoints").iterdir())
    result["checkpoint"] = {"bytes": size, "stall_s": stalls,
                            "async_median_s": statistics.median(stalls["async"]),
                            "sync_median_s": statistics.median(stalls["sync"])}

    values = {"train_tok_s": result["task"]["train_tok_s_median"],
              "ckpt_stall_ratio": result["checkpoint"]["async_median_s"]
              / result["checkpoint"]["sync_median_s"],
              "val_loss_drop": run.val_loss_drop}
    result["result"] = values
    path = _provenance.write(args.name, result)
    print(f"wrote {path}", file=sys.stderr)
    print(_provenance.result_line(values))


def qlora_beside_lora(base: Path, out: Path, args: argparse.Namespace) -> None:
    """Part 3: the task with LoRA, then QLoRA, on the GPU; into results/NAME.json's
    "qlora" entry, beside what the file holds."""
    import workbench

    task = {**TASK, "epochs": 1 if args.quick else TASK["epochs"], "device": "cuda"}
    entry = {"machine": _provenance.machine(), "versions": versions(), "model": base.name,
             "model_sha256": _provenance.sha256(base),
             "params": {"quick": args.quick, "data": DATA.name,
                        "data_sha256": _provenance.sha256(DATA), "task": task,
                        "order": list(METHODS)}}
    for method in METHODS:
        print(f"{method} on {DATA.name}: {task}", file=sys.stderr)
        run = workbench.finetune(base, DATA, out=out / method, method=method, **task).wait()
        print(repr(run), file=sys.stderr)
        entry[method] = _summary(run)
    lora, qlora = entry["lora"], entry["qlora"]
    entry["note"] = MEMORY_NOTE
    entry["saving"] = {key: {"bytes": lora[key] - qlora[key], "ratio": qlora[key] / lora[key]}
                       for key in ("loaded_memory", "peak_memory")}
    entry["result"] = {"lora_tok_s": lora["train_tok_s_median"],
                       "qlora_tok_s": qlora["train_tok_s_median"],
                       "lora_peak_memory": lora["peak_memory"],
                       "qlora_peak_memory": qlora["peak_memory"],
                       "qlora_peak_ratio": entry["saving"]["peak_memory"]["ratio"],
                       "qlora_loaded_ratio": entry["saving"]["loaded_memory"]["ratio"],
                       "lora_val_loss_drop": lora["val_loss_drop"],
                       "qlora_val_loss_drop": qlora["val_loss_drop"]}
    entry["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entry["thermal"] = _provenance.thermal()
    path = _provenance.RESULTS / f"{args.name}.json"
    held = json.loads(path.read_text()) if path.exists() else {}
    if held:  # its date and thermal verdict stay its earlier run's (none: null)
        held.setdefault("thermal", None)
    path = _provenance.write(args.name, {**held, "qlora": entry})
    print(f"wrote {path}", file=sys.stderr)
    print(_provenance.result_line(entry["result"]))


def _summary(run) -> dict:
    """A run's effect, speed and GPU memory (bytes)."""
    rates = [s["tokens"] / s["seconds"] for s in _steps(run)]
    return {"steps": run.steps, "val_loss_before": run.val_loss_before,
            "val_loss_after": run.val_loss_after, "val_loss_drop": run.val_loss_drop,
            "train_tok_s_median": statistics.median(rates),
            "train_tok_s_mean": run.tokens_per_s, "loaded_memory": run.loaded_memory,
            "peak_memory": max(s["memory"] for s in run.history["steps"]),
            "history": {"train": run.history["train"], "val": run.history["val"],
                        "step_s": [s["seconds"] for s in run.history["steps"]]}}


def _steps(run) -> list[dict]:
    """Each step's numbers, but the first (it warms up the allocator and kernels)."""
    return run.history["steps"][1:]


if __name__ == "__main__":
    main()
