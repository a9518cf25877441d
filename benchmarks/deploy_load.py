"""The deployed service under load, side by side with llama-cpp-python's stock server.

Both serve the same model file with the same threads. Clients stream text completions
(greedy, up to --max-tokens tokens; completions, so a synthetic model without a chat
template serves too) in a closed loop for --seconds at each concurrency;
the servers take turns, round by round, so the machine's noise falls on both.
Throughput counts streamed tokens over the wall time; TTFT is request to first token.

    python benchmarks/deploy_load.py [--quick]
    python benchmarks/deploy_load.py --gpu --levels 1,8 --no-stock   # on a GPU machine

The GPU run writes deploy_load_gpu.json; the CPU run quotes its batch8_vs_single_gpu.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _provenance  # noqa: E402
from benchmarks.engine_overhead import chosen_model, model_arguments  # noqa: E402

PROMPTS = ["Once upon a time, a lighthouse keeper", "A bicycle stays upright because",
           "The day at the seaside began", "The first thing a new gardener should know is",
           "The history of bread starts", "The life of a honeybee", "Volcanoes form when",
           "Dear friend, our trip to the mountains"]


def _stock_server(model: Path, port: int, threads: int, n_ctx: int, gpu: bool) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
         "127.0.0.1", "--port", str(port), "--n_threads", str(threads), "--n_ctx", str(n_ctx),
         "--n_gpu_layers", "-1" if gpu else "0", "--model_alias", "stock",
         # by default a new request interrupts the one streaming: queue them instead
         "--interrupt_requests", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait(base: str, path: str, proc: Any, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server at {base} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + path, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{base} did not start")


def _stream(host: str, port: int, body: dict) -> tuple[int, float | None, int]:
    """One streamed completion over plain HTTP (the standard library only, so the
    GPU machine needs no client package): (status, TTFT s, content chunks)."""
    import http.client

    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return resp.status, None, 0
        first, n = None, 0
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return 500, first, n
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                if first is None:
                    first = time.monotonic() - t0
                n += 1
        return 200, first, n
    finally:
        conn.close()


def load(base: str, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """`clients` closed-loop streaming clients for `seconds`."""
    host, port = base.removeprefix("http://").split(":")
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()
    ttfts: list[float] = []
    counts = {"tokens": 0, "requests": 0, "errors": 0, "refused": 0}

    def run(i: int) -> None:
        k = i
        while time.monotonic() < stop_at:
            body = {"model": model, "stream": True, "temperature": 0,
                    "max_tokens": max_tokens,
                    "prompt": PROMPTS[k % len(PROMPTS)]}
            try:
                status, first, n = _stream(host, int(port), body)
            except OSError:
                status, first, n = 0, None, 0
            if status == 429:
                with lock:
                    counts["refused"] += 1
                time.sleep(0.2)
                continue
            k += len(PROMPTS) // 2 + 1
            with lock:
                if status != 200:
                    counts["errors"] += 1
                    continue
                counts["tokens"] += n
                counts["requests"] += 1
                if first is not None:
                    ttfts.append(first)

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) >= 2 else [0.0] * 19
    return {"clients": clients, "wall_s": wall, **counts,
            "tokens_per_s": counts["tokens"] / wall,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p95_s": q[18] if ttfts else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round of 10 s per level")
    ap.add_argument("--gpu", action="store_true", help="all layers on the GPU")
    ap.add_argument("--levels", default="1,4,16", help="concurrencies to measure")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-stock", action="store_true", help="measure the service alone")
    ap.add_argument("--threads", type=int, default=None)
    model_arguments(ap)
    args = ap.parse_args()
    from workbench.serve.check import free_port, start, stop

    model = chosen_model(args)
    levels = [int(x) for x in args.levels.split(",")]
    seconds = args.seconds or (10.0 if args.quick else 30.0)
    rounds = args.rounds or (1 if args.quick else 2)
    threads = args.threads or (os.cpu_count() or 1)
    per_request_ctx = 512
    n_parallel = max(levels)
    name = "deploy_load_gpu" if args.gpu else "deploy_load"

    work = _provenance.scratch("deploy-load-")
    svc = work / "svc"
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "deploy", "--model", str(model),
                        "--output", str(svc), "--device", "gpu" if args.gpu else "cpu",
                        "--n-parallel", str(n_parallel),
                        "--n-ctx-per-request", str(per_request_ctx)],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"deploy failed: {r.stderr}")
    config = json.loads((svc / "service.json").read_text())
    config["load"]["threads"] = threads
    config["server"]["max_queue"] = 4 * n_parallel
    (svc / "service.json").write_text(json.dumps(config))
    ours_port, stock_port = free_port(), free_port()
    ours = start(svc, ours_port)
    servers = {"workbench": (f"http://127.0.0.1:{ours_port}", config["model"]["name"], ours)}
    stock = None
    if not args.no_stock:
        stock = _stock_server(model, stock_port, threads, 2048, args.gpu)
        servers["stock"] = (f"http://127.0.0.1:{stock_port}", "stock", stock)
    try:
        _wait(servers["workbench"][0], "/health", ours)
        if stock is not None:
            _wait(servers["stock"][0], "/v1/models", stock)
        for label, (base, served, _) in servers.items():  # warm both
            load(base, served, 1, 2.0, 8)
        runs: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in levels} for k in servers}
        for rnd in range(rounds):
            for c in levels:
                for label, (base, served, _) in servers.items():
                    m = load(base, served, c, seconds, args.max_tokens)
                    runs[label][c].append(m)
                    print(f"round {rnd + 1} {label:9s} c={c:2d}: {m['tokens_per_s']:7.1f} tok/s, "
                          f"{m['requests']} requests, TTFT p50 {m['ttft_p50_s'] or 0:.2f} s "
                          f"p95 {m['ttft_p95_s'] or 0:.2f} s, errors {m['errors']}, "
                          f"429 {m['refused']}", file=sys.stderr, flush=True)
    finally:
        stop(ours)
        if stock is not None:
            stop(stock)

    def med(label: str, c: int, key: str) -> float:
        vals = [m[key] for m in runs[label][c] if m[key] is not None]
        return statistics.median(vals) if vals else 0.0

    summary = {label: {c: {k: med(label, c, k) for k in ("tokens_per_s", "ttft_p50_s",
                                                         "ttft_p95_s")}
                       for c in levels} for label in servers}
    errors = sum(m["errors"] for label in runs for c in levels for m in runs[label][c])
    result: dict[str, Any] = {"errors": errors}
    top = max(levels)
    if stock is not None:
        for c in levels:
            result[f"throughput_vs_stock_c{c}"] = (summary["workbench"][c]["tokens_per_s"] /
                                                   max(summary["stock"][c]["tokens_per_s"],
                                                       1e-9))
    result[f"p95_ttft_c{top}_s"] = summary["workbench"][top]["ttft_p95_s"]
    if 1 in levels:
        for c in levels:
            if c > 1:
                result[f"batch{c}_vs_single{'_gpu' if args.gpu else ''}"] = (
                    summary["workbench"][c]["tokens_per_s"] /
                    max(summary["workbench"][1]["tokens_per_s"], 1e-9))
    gpu_file = _provenance.RESULTS / "deploy_load_gpu.json"
    if not args.gpu and gpu_file.exists():
        result["batch8_vs_single_gpu"] = json.loads(gpu_file.read_text())["result"].get(
            "batch8_vs_single_gpu")
    _provenance.write(name, {
        "machine": _provenance.machine(), "model": model.name,
        "model_sha256": _provenance.sha256(model),
        "params": {"levels": levels, "seconds": seconds, "rounds": rounds,
                   "max_tokens": args.max_tokens, "threads": threads,
                   "n_parallel": n_parallel, "n_ctx_per_request": per_request_ctx,
                   "gpu": args.gpu, "sampling": "greedy", "stream": True,
                   "stock": "llama_cpp.server (one request at a time)"},
        "summary": summary, "runs": runs, "result": result})
    order = ["throughput_vs_stock_c16", f"p95_ttft_c{top}_s", "batch8_vs_single_gpu", "errors"]
    line = {k: result[k] for k in order if k in result}
    line.update({k: v for k, v in result.items() if k not in line})
    print(_provenance.result_line(line))


if __name__ == "__main__":
    main()
