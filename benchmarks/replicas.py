"""Replicas on Ray Serve: what the prefix-aware router changes, side by side with Ray's
default router (power of two choices), then a replica killed and a rolling update under
the same load.

Two replicas of the default model, one thread each (2 cores), each with a prefix cache of
--cache-mib of RAM and no disk tier: room for the KV states of three of the four course
documents (an entry is a whole prompt, document and question), as a lab replica's cache
holds a few long documents, not every one a class uses. 16 clients (closed loop,
greedy, streamed) each ask 3 questions about one of 4 documents of about 2,000 tokens; the
documents were each sent once before the measured load (the same warm-up for both routers).
A request counts as a cache hit when the replica restored at least half its prompt from its
prefix cache (the usage's cached_tokens). Then the same load with no shared prefix (every
prompt its own): the load guard must cost nothing there.

    python benchmarks/replicas.py [--quick]

RESULT keys: ttft_p95_prefix_vs_default, hit_rate_prefix, hit_rate_default,
low_sharing_ttft_p95_vs_default, lost_on_kill, failed_on_update, update_s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _provenance  # noqa: E402

TOPICS = ("photosynthesis", "the Roman roads", "the steam engine", "coral reefs")


def document(topic: str, words: int) -> str:
    """A course document of about `words` words about `topic` (fixed by the topic)."""
    rng = random.Random(topic)
    nouns = ("system", "process", "structure", "example", "measurement", "change", "cause",
             "result", "pattern", "model", "question", "record", "method", "part", "role")
    verbs = ("shows", "explains", "depends on", "shapes", "limits", "supports", "follows",
             "reveals", "connects", "describes")
    out = [f"Course notes on {topic}."]
    n = 5
    while n < words:
        s = (f"In {topic}, the {rng.choice(nouns)} {rng.choice(verbs)} the "
             f"{rng.choice(nouns)} of each {rng.choice(nouns)}, as section {len(out)} notes.")
        out.append(s)
        n += len(s.split())
    return " ".join(out)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[k]


class Service:
    def __init__(self, folder: Path) -> None:
        from workbench._net import free_port
        from workbench.serve.check import start, wait_healthy

        self.folder, self.port = folder, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = start(folder, self.port)
        wait_healthy(self.base, self.proc, timeout_s=300)

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.base}/health", timeout=30) as r:
            return json.loads(r.read())

    def metrics(self) -> dict[str, float]:
        """The router's and the replicas' counters from /metrics."""
        with urllib.request.urlopen(f"{self.base}/metrics", timeout=30) as r:
            text = r.read().decode()
        return {key: float(value) for line in text.splitlines()
                if line.startswith(("workbench_router_", "workbench_replica_"))
                for key, _, value in [line.rpartition(" ")]}

    def stop(self) -> None:
        from workbench.serve.check import stop

        stop(self.proc)


def ask(base: str, system: str, question: str, max_tokens: int) -> dict[str, Any]:
    """One streamed, greedy chat request: TTFT, cached and prompt tokens, or its error."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    ttft = None
    usage = None
    try:
        stream = client.chat.completions.create(
            model="default", messages=[{"role": "system", "content": system},
                                       {"role": "user", "content": question}],
            max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                usage = chunk.usage
    except Exception as e:  # noqa: BLE001: a failed request is a result here
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "prompt": usage.prompt_tokens, "cached": cached, "total": time.perf_counter() - t0,
            "tokens": usage.completion_tokens}


def load(base: str, systems: list[str], clients: int, per_client: int, max_tokens: int,
         during: Any = None) -> dict[str, Any]:
    """`clients` closed-loop clients, client k on systems[k % len]; `during()` runs in the
    middle of it (a kill, an update)."""
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(per_client):
            r = ask(base, systems[k % len(systems)], f"Question {j} from student {k}: "
                    "what does section 3 say?", max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    extra = None
    if during is not None:
        time.sleep(2.0)
        extra = during()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    hits = [r for r in ok if r["cached"] >= 0.5 * r["prompt"]]
    return {"requests": len(results), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if "error" in r})[:5],
            "ttft_p50": percentile([r["ttft"] for r in ok], 0.5),
            "ttft_p95": percentile([r["ttft"] for r in ok], 0.95),
            "hit_rate": len(hits) / len(ok) if ok else 0.0,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "wall_s": wall,
            "during": extra}


def _deployed(folder: Path, router: str | None, args: argparse.Namespace) -> Path:
    """The service folder: one engine (router None) or 2 replicas routed by `router`."""
    import workbench

    scale = {"replicas": 2, "router": router} if router else {}
    workbench.deploy("default", output=folder, force=True, n_parallel=args.n_parallel,
                     n_ctx_per_request=args.n_ctx, kv_ram_mib=args.cache_mib, kv_disk_mib=0,
                     **scale)
    return folder


def latency(base: str, n: int) -> float:
    """Median seconds of a one-token request, one at a time: the front's cost per request
    (a single engine's service against the replicas' front and Ray Serve's hop)."""
    times = []
    for i in range(n):
        r = ask(base, "Be brief.", f"Say {i}.", 1)
        times.append(r["total"])
    return sorted(times)[len(times) // 2]


def kill_one(service: Service) -> dict[str, Any]:
    busy = [r for r in service.health()["replicas"] if r["streams"] > 0]
    victim = max(busy, key=lambda r: r["streams"]) if busy else None
    if victim is not None:
        os.kill(victim["pid"], signal.SIGKILL)
    return {"killed_pid": victim and victim["pid"], "its_streams": victim and victim["streams"]}


def update(folder: Path, model: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "deploy", "--output",
                        str(folder), "--update", str(model)], capture_output=True, text=True,
                       timeout=900)
    line = (r.stdout.strip().splitlines() or [""])[-1]
    try:
        seconds = float(line.rsplit("after ", 1)[1].split(" s")[0])
    except (IndexError, ValueError):
        seconds = float("nan")
    return {"rc": r.returncode, "update_s": seconds, "wall_s": time.perf_counter() - t0,
            "out": (r.stdout + r.stderr)[-400:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter documents, fewer requests")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=None)
    ap.add_argument("--words", type=int, default=None, help="words per document")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--n-parallel", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=3072)
    ap.add_argument("--cache-mib", type=int, default=None,
                    help="each replica's prefix cache (default: room for 3 documents)")
    ap.add_argument("--only-update", action="store_true",
                    help="only the rolling update under load (prefix router): writes "
                         "replicas_update.json")
    args = ap.parse_args()
    words = args.words or (500 if args.quick else 1500)
    per_client = args.per_client or (2 if args.quick else 3)
    if args.quick:
        args.clients = min(args.clients, 8)
        args.n_ctx = 1024
    import workbench
    from workbench.models.default import default_model_path

    model = Path(default_model_path())
    docs = [document(t, words) for t in TOPICS]
    work = _provenance.scratch("replicas-")
    kv_per_token = 30 * 2 * 192 * 2  # the default model's f16 K and V, bytes per token
    doc_tokens = int(words * 1.35)
    if args.cache_mib is None:  # three documents' KV states, and a little
        args.cache_mib = max(16, int(3.3 * doc_tokens * kv_per_token / 2**20))
    unique = [document(f"topic {k}", max(60, words // 5)) for k in range(args.clients)]
    runs: dict[str, Any] = {}
    if args.only_update:
        return update_only(work, model, docs, per_client, args)
    single = Service(_deployed(work / "svc-single", None, args))
    try:
        runs["single_engine_latency_s"] = latency(single.base, 20)
    finally:
        single.stop()
    for router in ("prefix", "default"):
        folder = _deployed(work / f"svc-{router}", router, args)
        service = Service(folder)
        try:
            runs[f"{router}_latency_s"] = latency(service.base, 20)
            for d in docs:  # each document once, one after another: the same warm-up
                ask(service.base, d, "What is this about?", 4)
            runs[router] = load(service.base, docs, args.clients, per_client, args.max_tokens)
            runs[f"{router}_low_sharing"] = load(service.base, unique, args.clients, 1,
                                                 args.max_tokens)
            runs[f"{router}_metrics"] = service.metrics()
            print(router, json.dumps({k: runs[router][k] for k in
                                      ("ttft_p50", "ttft_p95", "hit_rate", "failed")}),
                  flush=True)
            if router == "prefix":
                runs["kill"] = load(service.base, docs, args.clients, per_client,
                                    max(args.max_tokens, 48), during=lambda: kill_one(service))
                time.sleep(3)  # Ray Serve starts a replica in the dead one's place
                new = workbench.prune(model, layers=[28], out=work / "v2.gguf",
                                      progress=False).path
                runs["update"] = load(service.base, docs, args.clients, per_client,
                                      args.max_tokens, during=lambda: update(folder, new))
                print("kill", runs["kill"]["failed"], "update", runs["update"]["failed"],
                      runs["update"]["during"], flush=True)
        finally:
            service.stop()
    p, d = runs["prefix"], runs["default"]
    lp, ld = runs["prefix_low_sharing"], runs["default_low_sharing"]
    line = {"ttft_p95_prefix_vs_default": p["ttft_p95"] / d["ttft_p95"],
            "hit_rate_prefix": p["hit_rate"], "hit_rate_default": d["hit_rate"],
            "low_sharing_ttft_p95_vs_default": lp["ttft_p95"] / ld["ttft_p95"],
            "lost_on_kill": runs["kill"]["failed"],
            "failed_on_update": runs["update"]["failed"],
            "update_s": runs["update"]["during"]["update_s"],
            "tokens_per_s_prefix_vs_default": p["tokens_per_s"] / d["tokens_per_s"],
            "front_overhead_ms": 1000 * (runs["prefix_latency_s"] -
                                         runs["single_engine_latency_s"])}
    _provenance.write("replicas", {
        "machine": _provenance.machine(), "model": model.name,
        "model_sha256": _provenance.sha256(model),
        "llama_cpp": _llama_version(),
        "params": {"replicas": 2, "threads_per_replica": "idle cores / 2", "clients":
                   args.clients, "requests_per_client": per_client, "documents": len(docs),
                   "document_words": words, "document_tokens_approx": doc_tokens,
                   "cache_mib_per_replica": args.cache_mib, "disk_tier": "off",
                   "n_parallel": args.n_parallel, "max_tokens": args.max_tokens,
                   "greedy": True},
        "runs": runs, "summary": line})
    print(_provenance.result_line(line))


def update_only(work: Path, model: Path, docs: list[str], per_client: int,
                args: argparse.Namespace) -> None:
    import workbench

    folder = _deployed(work / "svc-prefix", "prefix", args)
    service = Service(folder)
    try:
        for d in docs:
            ask(service.base, d, "What is this about?", 4)
        new = workbench.prune(model, layers=[28], out=work / "v2.gguf", progress=False).path
        run = load(service.base, docs, args.clients, per_client, args.max_tokens,
                   during=lambda: update(folder, new))
    finally:
        service.stop()
    line = {"failed_on_update": run["failed"], "update_s": run["during"]["update_s"],
            "update_ttft_p95_s": run["ttft_p95"], "requests": run["requests"]}
    _provenance.write("replicas_update", {
        "machine": _provenance.machine(), "model": model.name,
        "model_sha256": _provenance.sha256(model), "llama_cpp": _llama_version(),
        "params": {"replicas": 2, "clients": args.clients, "requests_per_client": per_client,
                   "documents": len(docs), "cache_mib_per_replica": args.cache_mib,
                   "n_parallel": args.n_parallel, "max_tokens": args.max_tokens},
        "runs": {"update": run}, "summary": line})
    print(_provenance.result_line(line))


def _llama_version() -> str | None:
    from workbench.device.provenance import package_version

    return package_version("llama-cpp-python")


if __name__ == "__main__":
    main()
