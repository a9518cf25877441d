"""Decoding and serving on a shared machine: threads chosen automatically against every
fixed thread count, on an idle machine and with cores kept busy by another process.

Decode: the default model generates --tokens tokens (greedy, past end-of-sequence) with
`threads` left to the workbench ("auto": the cores idle at load, re-chosen while
decoding) and with each fixed count from 1 to the usable cores. Configurations take
turns within each round, so the machine's noise falls on all of them. "busy" keeps all
usable cores but one busy with spinning processes, started before the load; "late"
loads on the idle machine and starts them just before decoding (the governor has to
notice). Each ratio divides auto's median decode speed by the best fixed count's median.

Service: the default model deployed (4 parallel requests), started with the cores busy,
then 64 chat requests sent at once. A request answered (completed, or refused with 429
and Retry-After) counts; one that timed out or failed does not. The same service with
threads fixed at the usable cores (what it ran with before threads were chosen from the
idle cores) runs too, for comparison.

    python benchmarks/contention.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _provenance  # noqa: E402


@contextmanager
def busy(n: int) -> Iterator[None]:
    """`n` processes spinning on the CPU, as other users' work on a shared machine."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.5)  # running before anything is measured
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def decode_speed(threads: int | None, tokens: int, late_busy: int = 0) -> tuple[float, int]:
    """(decode tokens/s, threads at the end) of one greedy generation after a fresh load."""
    import workbench

    settings: dict[str, Any] = {"n_ctx": 1024, "kv_cache": "off"}
    if threads is not None:
        settings["threads"] = threads
    workbench.load_model(progress=False, **settings)
    workbench.generate("Hello", max_tokens=4, temperature=0)  # warm
    if late_busy:
        with busy(late_busy):
            r = workbench.generate("Once upon a time", max_tokens=tokens, temperature=0,
                                   ignore_eos=True)
    else:
        r = workbench.generate("Once upon a time", max_tokens=tokens, temperature=0,
                               ignore_eos=True)
    return r.metrics.decode_tps, r.metrics.n_threads


def decode_part(usable: int, rounds: int, tokens: int) -> dict[str, Any]:
    configs: list[int | None] = [None, *range(1, usable + 1)]
    name = {None: "auto", **{t: f"fixed_{t}" for t in range(1, usable + 1)}}
    out: dict[str, Any] = {}
    for condition in ("idle", "busy", "late"):
        speeds: dict[str, list[float]] = {name[c]: [] for c in configs}
        ends: list[int] = []
        for r in range(rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for c in order:
                if condition == "busy":
                    with busy(usable - 1):
                        tps, end = decode_speed(c, tokens)
                else:
                    tps, end = decode_speed(c, tokens, late_busy=usable - 1
                                            if condition == "late" else 0)
                speeds[name[c]].append(tps)
                if c is None:
                    ends.append(end)
            print(f"{condition} round {r + 1}: " + ", ".join(
                f"{k} {v[-1]:.1f}" for k, v in speeds.items()), flush=True)
        med = {k: statistics.median(v) for k, v in speeds.items()}
        best = max((k for k in med if k != "auto"), key=med.get)
        out[condition] = {"tokens_per_s": speeds, "median": med, "best_fixed": best,
                          "auto_threads_at_end": ends,
                          "auto_vs_best_fixed": med["auto"] / med[best]}
    return out


def _ask(base: str, name: str, i: int, timeout: float) -> tuple[str, int]:
    """One chat request: ("done" | "429" | what went wrong, completion tokens)."""
    import http.client
    import urllib.parse

    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": name, "max_tokens": 16, "temperature": 0.7, "seed": i,
             "messages": [{"role": "user", "content": f"Say fact number {i}."}]}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read() or b"{}")
        if resp.status == 200:
            return "done", body["usage"]["completion_tokens"]
        if resp.status == 429 and int(resp.headers.get("Retry-After", "0")) >= 1:
            return "429", 0
        return f"status {resp.status}", 0
    except TimeoutError:
        return "timeout", 0
    except OSError as e:
        return f"error {e!r}", 0
    finally:
        conn.close()


def service_part(folder: Path, usable: int, timeout: float,
                 fixed_threads: int | None) -> dict[str, Any]:
    from workbench.serve.check import free_port, start, stop, wait_healthy

    if fixed_threads is not None:  # the service as it ran before: threads from the cores
        config = json.loads((folder / "service.json").read_text())
        config["load"]["threads"] = fixed_threads
        (folder / "service.json").write_text(json.dumps(config))
    name = json.loads((folder / "service.json").read_text())["model"]["name"]
    with busy(usable - 1):
        port = free_port()
        proc = start(folder, port)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, proc)
            results: list[tuple[str, int]] = []
            lock, gate = threading.Lock(), threading.Barrier(64)

            def client(i: int) -> None:
                gate.wait()
                r = _ask(base, name, i, timeout)
                with lock:
                    results.append(r)

            t0 = time.monotonic()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout + 30)
            elapsed = time.monotonic() - t0
        finally:
            stop(proc)
    kinds = [k for k, _ in results]
    answered = kinds.count("done") + kinds.count("429")
    return {"threads": fixed_threads or "auto", "requests": 64,
            "completed": kinds.count("done"), "refused_429": kinds.count("429"),
            "failed": sorted(set(k for k in kinds if k not in ("done", "429"))),
            "failed_count": 64 - answered, "seconds": round(elapsed, 2),
            "completion_tokens_per_s": sum(n for _, n in results) / elapsed,
            "answered_frac": answered / 64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, 64 tokens")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="each service request's client timeout, s")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 4)
    tokens = args.tokens or (64 if args.quick else 128)

    import workbench
    from workbench._cpu import SPINCOUNT, usable_cores
    from workbench.models.default import default_model_path

    usable = usable_cores()
    if usable < 2:
        raise SystemExit("needs at least 2 usable cores (one to keep busy, one to decode)")
    model = default_model_path()
    machine = _provenance.machine()
    decode = decode_part(usable, rounds, tokens)
    workbench.unload()

    folder = _provenance.scratch("wb-contention-") / "service"
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "deploy", "--output",
                        str(folder), "--quantization", "none", "--n-parallel", "4",
                        "--n-ctx-per-request", "512"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    service_auto = service_part(folder, usable, args.timeout, None)
    print("service, auto threads:", service_auto, flush=True)
    service_fixed = service_part(folder, usable, args.timeout, usable)
    print(f"service, {usable} fixed threads:", service_fixed, flush=True)

    import llama_cpp

    result = {
        "auto_vs_best_fixed_busy": decode["busy"]["auto_vs_best_fixed"],
        "auto_vs_best_fixed_idle": decode["idle"]["auto_vs_best_fixed"],
        "auto_vs_best_fixed_late": decode["late"]["auto_vs_best_fixed"],
        "service_busy_completed_frac": service_auto["answered_frac"],
        "service_busy_fixed_completed_frac": service_fixed["answered_frac"],
    }
    _provenance.write("contention", {
        "machine": machine,
        "llama_cpp_python": llama_cpp.__version__,
        "model": {"path": str(model), "name": model.name, "sha256": _provenance.sha256(model)},
        "parameters": {"rounds": rounds, "tokens": tokens, "usable_cores": usable,
                       "busy_processes": usable - 1, "gomp_spincount": SPINCOUNT,
                       "service": {"n_parallel": 4, "n_ctx_per_request": 512,
                                   "requests_at_once": 64, "max_tokens": 16,
                                   "client_timeout_s": args.timeout}},
        "decode": decode,
        "service": {"auto": service_auto, "fixed": service_fixed},
        "result": result,
    })
    print(_provenance.result_line(result))


if __name__ == "__main__":
    main()
