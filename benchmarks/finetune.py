"""Fine-tuning: training throughput, the checkpoint stall, and the effect on a task.

On the default model (SmolLM2-135M-Instruct), through `workbench.finetune` (the
training process, as a user runs it):
1. Effect and throughput. LoRA on notebook 04's task (notebooks/data/workbench-help.jsonl,
   the notebook's settings): validation loss before and after, and training tokens/s
   (every token of each batch, forward and backward; the median step).
2. Checkpoint stall. The seconds the training loop is blocked per checkpoint, with the
   asynchronous double-buffered writer and with synchronous saving, in runs that
   alternate (async, sync, async, sync), a checkpoint after every step; medians.

Usage: python benchmarks/finetune.py [--quick] [--device cpu|cuda] [--base GGUF]
       [--name RESULT_NAME]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _provenance  # noqa: E402

DATA = ROOT / "notebooks" / "data" / "workbench-help.jsonl"
# notebook 04's settings
TASK = dict(epochs=3, batch_size=4, rank=8, lr=5e-4, max_len=256, eval_every=10,
            ckpt_every=20)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "peft", "safetensors")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one epoch, fewer stall rounds")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--base", default=None, help="the base GGUF (default: the default model)")
    ap.add_argument("--name", default="finetune", help="results/NAME.json")
    args = ap.parse_args()

    import workbench

    base = workbench.api.resolve_model(args.base)
    out = _provenance.scratch("wb-finetune-")
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


def _steps(run) -> list[dict]:
    """Each step's numbers, but the first (it warms up the allocator and kernels)."""
    return run.history["steps"][1:]


if __name__ == "__main__":
    main()
