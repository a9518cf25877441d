"""A model split across llama.cpp RPC nodes against the same model in one process:
prompt processing (pp) and decoding (tg) tokens/s as ratios, measured side by side,
and the time to re-plan and reload after a node is lost.

    python benchmarks/cluster.py [--quick]             # loopback nodes on this machine
    python benchmarks/cluster.py --gpu --gpu-mem-mib 96 --synthetic smollm2-135m \
        --vocab ggml-vocab-gpt-2.gguf                   # on a GPU machine

CPU (default): three `workbench rpc-worker` processes on 127.0.0.1. Each round loads the
default model in one process, across 2 nodes and across 3 nodes, in that order, and
measures each the same way: a 512-token prompt (pp), then 128 greedy tokens decoded at
context depth 512 (tg). Ratios are taken within a round and the median reported.
Re-plan: a 3-node model loses a node mid-generation (SIGKILL); the time from the crash
to the model loaded again on the other two is `replan_s`.

GPU (--gpu): this machine's GPU, capped by --gpu-mem-mib so the model fits only when
split, plus one CPU rpc-worker, against the whole model on the GPU alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _provenance  # noqa: E402
from benchmarks.engine_overhead import chosen_model, model_arguments  # noqa: E402

N_CTX = 1024
PROMPT_TOKENS = 512
TG_TOKENS = 128


def measure(prompt: str) -> dict[str, float]:
    """pp over the prompt, then tg of TG_TOKENS tokens after it (depth ~PROMPT_TOKENS)."""
    import workbench

    workbench.generate("Warm up.", max_tokens=8, temperature=0)
    r = workbench.generate(prompt, max_tokens=TG_TOKENS, temperature=0, ignore_eos=True)
    m = r.metrics
    return {"pp_tps": m.prompt_tps, "tg_tps": m.decode_tps, "prompt_tokens": m.prompt_tokens,
            "generated": m.generated_tokens}


def cpu_run(args: argparse.Namespace, model: Path) -> dict:
    import workbench
    from workbench.cluster.cluster import NodeLost

    c = workbench.rpc_cluster()
    nodes = c.start_local(3, threads=args.threads)
    prompt = make_prompt()
    common = {"model": str(model), "n_ctx": N_CTX, "threads": args.threads, "kv_cache": "off",
              "progress": False}
    rows = []
    for rnd in range(args.rounds):
        row = {}
        workbench.load_model(**common)
        row["single"] = measure(prompt)
        c.remove([nodes[2]])
        m2 = workbench.load_model(cluster=True, **common)
        row["nodes2"] = {**measure(prompt), "plan": m2.placement.rows()}
        c.add([nodes[2]])
        m3 = workbench.load_model(cluster=True, **common)
        row["nodes3"] = {**measure(prompt), "plan": m3.placement.rows()}
        rows.append(row)
        print(f"round {rnd + 1}: " + "  ".join(
            f"{k} pp {v['pp_tps']:.0f} tg {v['tg_tps']:.1f}" for k, v in row.items()), flush=True)
    # Re-plan after a node is lost mid-generation (3 nodes -> 2).
    victim = c.local_workers()[nodes[1]]
    stream = workbench.generate(prompt, max_tokens=400, temperature=0, ignore_eos=True,
                                stream=True)
    seen = 0
    try:
        for _ in stream:
            seen += 1
            if seen == 16:
                victim.kill()
    except NodeLost:
        pass
    recovered = c.wait_recovered()
    replan_s = c.last_replan_s
    after = measure(prompt) if recovered else None
    c.stop_local()

    def ratio(key: str, metric: str) -> float:
        return statistics.median(r[key][metric] / r["single"][metric] for r in rows)

    return {
        "rows": rows, "replan_s": replan_s, "recovered": recovered, "after_replan": after,
        "tokens_before_loss": seen,
        "ratios": {"tg_2nodes": ratio("nodes2", "tg_tps"), "pp_2nodes": ratio("nodes2", "pp_tps"),
                   "tg_3nodes": ratio("nodes3", "tg_tps"), "pp_3nodes": ratio("nodes3", "pp_tps")},
        "nodes": nodes,
    }


def gpu_run(args: argparse.Namespace, model: Path) -> dict:
    import workbench

    c = workbench.rpc_cluster()
    nodes = c.start_local(1, threads=args.threads)
    prompt = make_prompt()
    common = {"model": str(model), "n_ctx": N_CTX, "kv_cache": "off", "progress": False}
    rows = []
    for rnd in range(args.rounds):
        workbench.load_model(device="gpu", n_gpu_layers=-1, **common)
        alone = measure(prompt)
        try:
            workbench.load_model(device="gpu", n_gpu_layers=-1, gpu_mem_mib=args.gpu_mem_mib,
                                 **common)
            capped_alone = "fits"
        except workbench.WorkbenchError as e:
            capped_alone = e.message
        m = workbench.load_model(device="gpu", cluster=True, gpu_mem_mib=args.gpu_mem_mib,
                                 **common)
        split = {**measure(prompt), "plan": m.placement.rows()}
        rows.append({"gpu_alone": alone, "gpu_plus_cpu_node": split,
                     "capped_gpu_alone": capped_alone})
        print(f"round {rnd + 1}: GPU alone tg {alone['tg_tps']:.0f} pp {alone['pp_tps']:.0f}; "
              f"GPU+CPU node tg {split['tg_tps']:.0f} pp {split['pp_tps']:.0f}", flush=True)
    c.stop_local()
    return {"rows": rows, "nodes": nodes, "gpu_mem_mib": args.gpu_mem_mib, "ratios": {
        "tg_split_vs_gpu": statistics.median(r["gpu_plus_cpu_node"]["tg_tps"] /
                                             r["gpu_alone"]["tg_tps"] for r in rows),
        "pp_split_vs_gpu": statistics.median(r["gpu_plus_cpu_node"]["pp_tps"] /
                                             r["gpu_alone"]["pp_tps"] for r in rows)}}


def make_prompt() -> str:
    """About PROMPT_TOKENS tokens of plain prose for the default model's tokenizer."""
    text = ("The committee met on a grey morning to weigh the plans for the new bridge, "
            "and each member brought a list of questions about cost, safety and time. ")
    # The default tokenizer gives about 27 tokens per sentence: repeat to ~512 tokens.
    return text * (PROMPT_TOKENS // 27)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of the engine and of each node (default: 2 on the CPU "
                         "run, all cores on --gpu)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--gpu-mem-mib", type=int, default=96,
                    help="with --gpu: the GPU memory the planner may use, MiB")
    model_arguments(ap)
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
    if args.threads is None and not args.gpu:
        args.threads = 2
    import workbench
    model = chosen_model(args)
    data = gpu_run(args, model) if args.gpu else cpu_run(args, model)
    version = workbench.engine().worker.llama_cpp_version
    name = "cluster_gpu" if args.gpu else "cluster"
    _provenance.write(name, {
        "machine": _provenance.machine(),
        "llama_cpp_python": version,
        "model": {"path": str(model), "sha256": _provenance.sha256(model)},
        "params": {"n_ctx": N_CTX, "prompt_tokens": PROMPT_TOKENS, "tg_tokens": TG_TOKENS,
                   "threads": args.threads, "rounds": args.rounds, "nodes": "loopback "
                   "rpc-workers (GOMP_SPINCOUNT=10000)", "gpu_mem_mib": args.gpu_mem_mib
                   if args.gpu else None},
        **data,
    })
    r = data["ratios"]
    if args.gpu:
        print(_provenance.result_line({"tg_split_vs_gpu": r["tg_split_vs_gpu"],
                                       "pp_split_vs_gpu": r["pp_split_vs_gpu"]}))
    else:
        print(_provenance.result_line({"tg_ratio_2nodes": r["tg_2nodes"],
                                       "pp_ratio_2nodes": r["pp_2nodes"],
                                       "tg_ratio_3nodes": r["tg_3nodes"],
                                       "replan_s": data["replan_s"] or float("nan")}))
    workbench.engine().close()


if __name__ == "__main__":
    main()
