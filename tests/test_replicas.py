"""Replicas on Ray Serve (workbench/replicas): the router's policy and the argument checks
on their own, then one service of 2 replicas on a Ray started on loopback, driven with the
`openai` client: routing follows the prefix, a replica killed mid-stream, a rolling update
under load, and replicas that cannot start (another version, another file, a damaged
file), each failing clearly while the service goes on."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from workbench.errors import WorkbenchError
from workbench.replicas import launch
from workbench.replicas.prefix import PrefixIndex, block_hashes, request_text

DOC = " ".join(f"Section {i}: the course covers topic {i} with care and examples."
               for i in range(60))  # about 3,800 characters, 1,000 tokens


# ---- the policy, without Ray -------------------------------------------------------------

def _hashes(text: str) -> tuple[int, ...]:
    return block_hashes(request_text("chat", [{"role": "system", "content": text},
                                              {"role": "user", "content": "Hi"}]))


def test_the_router_sends_a_prefix_where_it_was_served_and_balances_load():
    ix = PrefixIndex(imbalance=2)
    a, b = _hashes("A" + DOC), _hashes("B" + DOC)
    assert len(a) > 20 and a[0] != b[0]
    first = ix.choose(["r1", "r2"], a)
    assert first.reason == "least"
    ix.served(first.replica, a, first.reason)
    ix.done(first.replica)
    other = ix.choose(["r1", "r2"], b)
    assert other.replica != first.replica  # equally loaded: the other one, in turn
    ix.served(other.replica, b, other.reason)
    ix.done(other.replica)
    for _ in range(3):  # each prefix goes back to its replica
        d = ix.choose(["r1", "r2"], a)
        assert (d.replica, d.reason, d.matched) == (first.replica, "prefix", len(a))
        ix.served(d.replica, a, d.reason)  # in flight: load builds up on r1
    d = ix.choose(["r1", "r2"], a)  # 3 in flight against 0: the guard sends it away
    assert (d.replica, d.reason) == (other.replica, "balance")
    ix.forget(first.replica)  # a replica that died: its cache went with it
    assert ix.choose(["r2", "r3"], a).reason == "least"
    snap = ix.snapshot()
    assert snap["decisions"] == {"least": 2, "prefix": 3}
    assert 0.5 < snap["hit_rate"] < 1


def test_replica_counts_are_checked():
    assert launch.parse_replicas(2) == launch.Replicas(2, 2)
    assert launch.parse_replicas("1-3") == launch.Replicas(1, 3)
    for bad, words in (("0", "at least one"), ("0-2", "at least one"),
                       ("3-1", r"MIN \(3\) is more"), ("two", "not a count"),
                       ("-1", "not a count"), ("", "not a count")):
        with pytest.raises(WorkbenchError, match=words):
            launch.parse_replicas(bad)
    with pytest.raises(WorkbenchError, match="unknown router"):
        launch.check_router("random")


def test_deploy_refuses_bad_replica_settings_before_any_work(tmp_path):
    import workbench

    out = tmp_path / "svc"
    for kwargs, words in (({"replicas": 0}, "at least one"), ({"replicas": "4-2"}, "MIN"),
                          ({"ray": "10.0.0.1:6379"}, "--ray needs --replicas"),
                          ({"replicas": 2, "router": "nearest"}, "unknown router")):
        with pytest.raises(WorkbenchError, match=words):
            workbench.deploy("default", output=out, **kwargs)
    assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "deploy", "--output", str(out),
                        "--replicas", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "at least one replica" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "deploy", "--output", str(out),
                        "--update", "default", "--quantization", "int8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not --quantization" in r.stderr  # refused, not ignored
    assert "Traceback" not in r.stderr


def test_a_ray_address_that_does_not_answer_is_a_clear_error():
    from workbench._net import free_port

    t0 = time.monotonic()
    with pytest.raises(WorkbenchError, match="no Ray cluster answers at 127.0.0.1"):
        launch.connect(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - t0 < 10
    with pytest.raises(WorkbenchError, match="not HOST:PORT"):
        launch.connect("head-node")


def test_a_replica_checks_versions_and_the_model_file(default_model, tmp_path):
    from workbench.models.hashing import file_sha256
    from workbench.replicas.replica import check_machine, versions

    sha = file_sha256(default_model)
    check_machine(str(default_model), sha, versions())  # the same machine: passes
    with pytest.raises(WorkbenchError,
                       match="version mismatch: workbench .* 0.0.0-other on the service"):
        check_machine(str(default_model), sha, {**versions(), "workbench": "0.0.0-other"})
    with pytest.raises(WorkbenchError, match="differs from the service's model"):
        check_machine(str(default_model), "0" * 64, versions())
    with pytest.raises(WorkbenchError, match="is not there"):
        check_machine(str(tmp_path / "gone.gguf"), sha, versions())


# ---- one service of 2 replicas ---------------------------------------------------------

@contextlib.contextmanager
def _service(out, **deploy):
    """A service folder deployed with `deploy`, served in the background: (out, base, proc)."""
    import workbench
    from workbench._net import free_port
    from workbench.serve.check import start, stop, wait_healthy

    workbench.deploy("default", output=out, **deploy)
    port = free_port()
    proc = start(out, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield out, base, proc
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    with _service(tmp_path_factory.mktemp("replicas") / "svc", replicas=2, n_parallel=2,
                  n_ctx_per_request=1024) as running:
        yield running


def _client(base: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def _get(base: str, path: str) -> str:
    with urllib.request.urlopen(f"{base}{path}", timeout=30) as r:
        return r.read().decode()


def _metric(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key[len(name):]] = float(value)
    return out


def _ask(client, system: str, question: str, **kw):
    return client.chat.completions.create(
        model="default", messages=[{"role": "system", "content": system},
                                   {"role": "user", "content": question}],
        max_tokens=kw.pop("max_tokens", 4), temperature=0, **kw)


def test_requests_follow_their_prefix(replicated):
    out, base, _ = replicated
    config = json.loads((out / "service.json").read_text())
    assert config["server"]["replicas"] == "2" and config["server"]["router"] == "prefix"
    assert "ray[serve]==" in (out / "requirements.txt").read_text()
    client = _client(base)
    docs = {"A": "Course A. " + DOC, "B": "Course B. " + DOC.replace("topic", "theme")}
    cached = {}
    for round_ in range(3):
        for name, doc in docs.items():
            r = _ask(client, doc, f"Question {round_} on {name}?")
            cached[(name, round_)] = r.usage.prompt_tokens_details.cached_tokens
    # after the first of each, the prefix was on the replica the request went to
    assert all(cached[(n, r)] > 800 for n in docs for r in (1, 2)), cached
    m = _get(base, "/metrics")
    decisions = _metric(m, "workbench_router_decisions_total")
    assert decisions.get('{router="prefix",reason="prefix"}', 0) >= 4, decisions
    per = _metric(m, "workbench_replica_requests_total")
    assert len(per) == 2 and sum(per.values()) >= 6, per  # both replicas served
    assert float(_metric(m, "workbench_router_prefix_hit_rate")[""]) > 0.5
    deadline = time.monotonic() + 10  # Ray reports a request done just after its stream ends
    while set(_metric(_get(base, "/metrics"), "workbench_replica_in_flight").values()) != {0.0}:
        assert time.monotonic() < deadline, _get(base, "/metrics")
        time.sleep(0.2)
    from workbench.dashboards.replicas import ReplicaMonitor

    reading = ReplicaMonitor(base).sample()  # the notebook's live view, one reading
    assert len(reading["replicas"]) == 2
    assert all(r["requests"] >= 1 and r["hit"] > 0.3 and r["ttft"] > 0
               for r in reading["replicas"].values()), reading


def test_a_replica_killed_mid_stream_is_retried_with_identical_output(replicated):
    _, base, proc = replicated
    client = _client(base)
    question = "Count from one to forty in words, separated by commas."
    whole = _ask(client, "You are terse.", question, max_tokens=96).choices[0].message.content
    stream = _ask(client, "You are terse.", question, max_tokens=96, stream=True)
    pieces, killed = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if killed is None and len(pieces) >= 5:
            health = json.loads(_get(base, "/health"))
            busy = [r for r in health["replicas"] if r["streams"] > 0]
            assert len(busy) == 1, health
            killed = busy[0]["pid"]
            os.kill(killed, signal.SIGKILL)
    assert killed is not None
    assert "".join(pieces) == whole  # resumed on the other replica, nothing twice
    assert proc.poll() is None
    m = _get(base, "/metrics")
    assert _metric(m, "workbench_replica_retries_total")[""] >= 1
    # a sampled request that had streamed is not resumed: it fails clearly, and the
    # service goes on (Ray Serve starts a replica in place of the dead one)
    r = _ask(client, "You are terse.", "Say hi.")
    assert r.choices[0].message.content


def test_a_rolling_update_under_load_drops_nothing(replicated, tmp_path):
    import workbench

    out, base, _ = replicated
    new = workbench.prune("default", layers=[28], out=tmp_path / "v2.gguf", progress=False)
    client = _client(base)
    failures, done = [], []
    stop = threading.Event()

    def load(k: int) -> None:
        while not stop.is_set():
            try:
                r = _ask(client, "You are terse.", f"Name a colour ({k}).", max_tokens=6)
                done.append(r.choices[0].finish_reason)
            except Exception as e:  # noqa: BLE001: every failure is counted
                failures.append(repr(e))

    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        r = subprocess.run([sys.executable, "-m", "workbench.cli", "deploy", "--output",
                            str(out), "--update", str(new.path)],
                           capture_output=True, text=True, timeout=300)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 replicas serve" in r.stdout and " s" in r.stdout
    assert failures == [] and len(done) >= 8, (failures, len(done))
    config = json.loads((out / "service.json").read_text())
    assert config["model"]["file"].startswith("model-") and (out / config["model"]["file"]).exists()


def test_replicas_that_cannot_start_fail_clearly_and_the_service_goes_on(replicated, tmp_path):
    """Another version, another file (sha256), a damaged file: each deployment fails with
    the replica's own reason; the running service keeps answering."""
    out, base, _ = replicated
    script = tmp_path / "bad.py"
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + b"\0" * 4096)
    script.write_text(f"""
import json, sys
from workbench.errors import WorkbenchError
from workbench.models.hashing import file_sha256
from workbench.replicas import launch
from workbench.replicas.replica import versions
launch.connect("auto")
model = {str(out / "model.gguf")!r}
sha = file_sha256(model)
cases = {{"version": (model, sha, {{**versions(), "llama-cpp-python": "0.0.1"}}),
         "sha256": (model, "f" * 64, versions()),
         "damaged": ({str(damaged)!r}, file_sha256({str(damaged)!r}), versions())}}
for name, (path, digest, expect) in cases.items():
    app = launch.deployment(model=path, sha256=digest, load={{"n_ctx": 512}},
                            replicas=launch.Replicas(1, 1), threads=1, n_parallel=1,
                            max_queue=1, router="default", request_timeout_s=10,
                            expect=expect, cpus=0)  # beside the service's replicas
    try:
        launch.run(app, name="bad-" + name)
        print(name, "STARTED")
    except WorkbenchError as e:
        print(name, "|", e.message)
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=240)
    lines = dict(ln.split(" ", 1) for ln in r.stdout.splitlines() if " " in ln)
    assert "version mismatch: llama-cpp-python" in lines.get("version", ""), r.stdout + r.stderr
    assert "differs from the service's model" in lines.get("sha256", ""), r.stdout
    assert "did not start" in lines.get("damaged", ""), r.stdout
    assert _ask(_client(base), "You are terse.", "Say hi.").choices[0].message.content


def test_min_max_replicas_scale_up_under_load(tmp_path):
    """--replicas 1-2: one replica idle, a second once requests queue (Ray Serve's
    autoscaling on ongoing requests per replica)."""
    with _service(tmp_path / "svc", replicas="1-2", n_parallel=1,
                  n_ctx_per_request=512) as (_, base, _proc):
        client = _client(base)
        seen: set[str] = set()
        stop_load = threading.Event()

        def load(k: int) -> None:
            while not stop_load.is_set():
                _ask(client, "You are terse.", f"Write about the sea ({k}).", max_tokens=48)

        threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(seen) < 2:
                seen |= {r["replica"] for r in json.loads(_get(base, "/health"))["replicas"]}
                time.sleep(1)
        finally:
            stop_load.set()
            for t in threads:
                t.join(60)
        assert len(seen) == 2, seen
