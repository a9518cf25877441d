"""The cluster on one machine: real rpc-workers (llama.cpp's RPC server) as separate
processes on loopback, the real default model split across them by the real engine."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from IPython.core.interactiveshell import InteractiveShell

import workbench
from workbench import _paths
from workbench.cluster import probe as P
from workbench.cluster.cluster import NodeLost
from workbench.cluster.local import _ready_line
from workbench.errors import WorkbenchError
from workbench.serve.check import free_port

PROMPT = "The three primary colours are"


def _worker(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "rpc-worker", "--port",
                             str(port), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = _ready_line(proc)
    if not line.startswith("rpc-worker ready"):
        proc.kill()
        pytest.fail(f"the rpc-worker did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
    return proc, f"127.0.0.1:{port}"


@pytest.fixture()
def cluster():
    """The process's cluster, emptied before and after; the engine closed after, so the
    other tests load the model on their own."""
    c = workbench.rpc_cluster()
    started: list[subprocess.Popen] = []
    c.test_workers = started
    yield c
    c.stop_local()
    workbench.engine().close()
    c.plan, c._load = None, None
    c._stop_watch()
    c.nodes.clear()
    c.policy = "manual"
    for p in started:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def reference():
    """Greedy text of the default model in one process."""
    workbench.load_model(progress=False, n_ctx=1024)
    text = workbench.generate(PROMPT, max_tokens=40, temperature=0).text
    workbench.engine().close()
    return text


# ---- the rpc-worker ------------------------------------------------------------------------


def test_rpc_worker_refuses_a_network_address_without_the_flag():
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "rpc-worker", "--host",
                        "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "no authentication" in r.stderr and "--allow-unauthenticated-network" in r.stderr
    assert "ssh -N -L" in r.stderr and "Traceback" not in r.stderr
    from workbench.cluster.rpc_worker import check_host

    check_host("127.0.0.1", False)
    check_host("::1", False)
    check_host("10.1.2.3", True)  # allowed only when asked for by name
    with pytest.raises(WorkbenchError, match="no authentication"):
        check_host("10.1.2.3", False)


def _has_gpu() -> bool:
    from workbench.device.profile import gpus

    return bool(gpus())


@pytest.mark.parametrize("args, words", [
    (["--mem-limit", "100000"], "more than"),
    (["--mem-limit", "-1"], "must be positive"),
    pytest.param(["--device", "gpu"], "no GPU device",
                 marks=pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")),
    (["--device", "tpu"], "cpu or gpu"),
])
def test_rpc_worker_bad_arguments(args, words):
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "rpc-worker", "--port",
                        str(free_port()), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_rpc_worker_port_in_use(cluster):
    proc, endpoint = _worker()
    cluster.test_workers.append(proc)
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "rpc-worker", "--port",
                        endpoint.split(":")[1]], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot listen" in r.stderr


def test_probe_and_status_page(cluster):
    proc, endpoint = _worker("--mem-limit", "1")
    cluster.test_workers.append(proc)
    info = P.probe(endpoint)
    assert info.version.startswith("7.") and len(info.devices) == 1
    assert info.devices[0].free > 2**30           # what the RPC server reports: all RAM
    assert info.status["mem_limit"] == 2**30 and info.usable == 2**30   # the limit wins
    assert info.kind == "cpu" and info.bandwidth_gbs > 0
    page = P.status(endpoint)
    assert page["pid"] == proc.pid and page["clients"] == []


# ---- bad nodes -----------------------------------------------------------------------------


def test_wrong_port_is_a_clear_error(cluster):
    with pytest.raises(P.NodeError, match="nothing listens") as e:
        cluster.add([f"127.0.0.1:{free_port()}"])
    assert e.value.hint and not cluster.nodes


def test_an_http_server_is_not_an_rpc_server(cluster):
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(P.NodeError, match="HTTP server, not a llama.cpp RPC server"):
            cluster.add([f"127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    assert not cluster.nodes


def test_a_server_that_answers_garbage(cluster):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        conn, _ = listener.accept()
        conn.recv(64)
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(P.NodeError, match="is not a llama.cpp RPC server"):
        cluster.add([f"127.0.0.1:{listener.getsockname()[1]}"])
    listener.close()


@pytest.mark.parametrize("text", ["nonsense", "host:", "host:99999", ":50052"])
def test_bad_endpoints(cluster, text):
    with pytest.raises(WorkbenchError, match="HOST:PORT"):
        cluster.add([text])


def test_a_node_that_advertises_more_memory_than_it_has(cluster, default_model):
    # No status page: the planner sees only what the RPC server reports (all the RAM),
    # but the node's allocations stop at 10 MiB.
    proc, endpoint = _worker("--mem-limit", "0.01", "--no-status")
    cluster.test_workers.append(proc)
    cluster.add([endpoint])
    with pytest.raises(P.NodeError) as e:
        workbench.load_model(progress=False, n_ctx=1024, cluster=True)
    assert e.value.endpoint == endpoint
    assert f"node {endpoint} could not hold its share" in e.value.message
    assert "advertised" in e.value.message and "--mem-limit" in e.value.hint
    assert proc.poll() is None  # the node lives on; nothing is half-loaded here
    workbench.load_model(progress=False, n_ctx=1024)  # the kernel's engine still works
    assert workbench.generate("Hi", max_tokens=3, temperature=0).text is not None


def test_a_model_that_fits_on_no_cluster(cluster):
    for _ in range(2):
        proc, endpoint = _worker("--mem-limit", "0.02")
        cluster.test_workers.append(proc)
        cluster.add([endpoint])
    with pytest.raises(WorkbenchError, match="does not fit on this cluster") as e:
        workbench.load_model(progress=False, n_ctx=1024, cluster=True)
    assert "MiB" in e.value.message and "%cluster add" in e.value.hint


def test_cluster_load_without_nodes(cluster):
    with pytest.raises(WorkbenchError, match="no node"):
        workbench.load_model(progress=False, cluster=True)


# ---- splitting, losing, joining ------------------------------------------------------------


def test_split_across_three_workers_is_greedy_identical(cluster, reference):
    endpoints = cluster.start_local(3)
    m = workbench.load_model(progress=False, n_ctx=1024, cluster=True)
    plan = m.placement
    assert plan.nodes == tuple(endpoints)
    held = [len(s.layers) for s in plan.shares]
    # loopback nodes share this machine's cores: this process keeps no layers
    assert held[0] == 0 and sum(held) == 30 and all(h > 0 for h in held[1:])
    assert plan.shares[-1].output and m.n_gpu_layers == 31
    assert workbench.generate(PROMPT, max_tokens=40, temperature=0).text == reference
    # speculative decoding across the split: drafts are checked through the nodes
    spec = workbench.generate(PROMPT, max_tokens=40, temperature=0, speculative="ngram")
    assert spec.metrics.speculative == "ngram" and spec.text
    pages = [P.status(e) for e in endpoints]
    assert all(len(p["clients"]) == 1 for p in pages)  # each node serves the engine
    text = repr(cluster.status())
    assert all(e in text for e in endpoints) and "holding layers" in text
    assert "30 + output to 3 RPC node(s)" in repr(m)
    from workbench import api

    if api.session().publisher is not None:  # what the JupyterLab panel shows
        placement = api.session().publisher.snapshot()["placement"]
        assert placement["device"] == "cluster" and placement["nodes"] == list(endpoints)


def test_a_node_killed_mid_generation(cluster, reference):
    endpoints = cluster.start_local(3)
    first = workbench.load_model(progress=False, n_ctx=1024, cluster=True)
    victim = cluster.local_workers()[endpoints[1]]
    stream = workbench.generate("The history of the Roman Empire began when", max_tokens=300,
                                temperature=0, stream=True)
    seen = 0
    with pytest.raises(NodeLost) as e:
        for _ in stream:
            seen += 1
            if seen == 10:
                victim.kill()
    assert e.value.endpoint == endpoints[1] and endpoints[1] in e.value.message
    assert "re-planned onto 2 remaining node(s)" in e.value.hint
    assert seen >= 10
    # the next request runs on the re-planned model
    assert workbench.generate(PROMPT, max_tokens=40, temperature=0).text == reference
    assert cluster.plan.nodes == (endpoints[0], endpoints[2])
    assert cluster.nodes[endpoints[1]].state == "lost" and cluster.last_replan_s > 0
    assert workbench.engine().model.threads == first.threads  # the same settings, re-planned
    log = [json.loads(x) for x in (_paths.home() / "cluster.log").read_text().splitlines()]
    kinds = [x["kind"] for x in log[-3:]]
    assert kinds[-2:] == ["lost", "replanned"] and endpoints[1] in log[-1]["text"]


def test_a_request_sent_as_a_node_dies_is_retried(cluster, reference):
    endpoints = cluster.start_local(2)
    workbench.load_model(progress=False, n_ctx=1024, cluster=True)
    cluster.local_workers()[endpoints[0]].kill()
    # The dead node is noticed by the request (or by the watcher first); either way the
    # request that had produced nothing runs again on the re-planned model.
    assert workbench.generate(PROMPT, max_tokens=40, temperature=0).text == reference
    assert cluster.plan.nodes == (endpoints[1],)


def test_a_node_lost_while_idle_is_replanned_by_the_watcher(cluster, reference):
    endpoints = cluster.start_local(2)
    workbench.load_model(progress=False, n_ctx=1024, cluster=True)
    cluster.local_workers()[endpoints[1]].kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
            cluster.plan is not None and cluster.plan.nodes == (endpoints[0],)):
        time.sleep(0.2)
    assert cluster.plan is not None and cluster.plan.nodes == (endpoints[0],)
    assert any("stopped answering its status page" in e.text for e in cluster.events)
    assert workbench.generate(PROMPT, max_tokens=40, temperature=0).text == reference


def test_a_joining_node_and_rebalance(cluster, reference):
    first = cluster.start_local(1)
    workbench.load_model(progress=False, n_ctx=1024, cluster=True)
    assert cluster.plan.nodes == tuple(first)
    second = cluster.start_local(1)  # manual policy: the model stays where it is
    assert cluster.plan.nodes == tuple(first)
    assert "%cluster rebalance" in cluster.events[-1].text
    plan = cluster.rebalance()
    assert plan.nodes == tuple(first + second) and cluster.last_replan_s > 0
    assert workbench.generate(PROMPT, max_tokens=40, temperature=0).text == reference
    cluster.policy = "auto"
    third = cluster.start_local(1)
    assert cluster.plan.nodes == tuple(first + second + third)
    assert workbench.generate(PROMPT, max_tokens=40, temperature=0).text == reference
    with pytest.raises(WorkbenchError, match="holds layers"):
        cluster.remove(third)


def test_magics_and_topology(cluster, reference):
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext workbench", store_history=False)
    r = sh.run_cell("%cluster local 2")
    assert r.success, r.error_in_exec
    r = sh.run_cell("%load_model --cluster --n-ctx 1024")
    assert r.success, r.error_in_exec
    assert "layers" in repr(r.result) and "details: .placement" in repr(r.result)
    r = sh.run_cell("%cluster status")
    assert r.success and "holding layers" in repr(r.result)
    r = sh.run_cell("%cluster topology")
    assert r.success, r.error_in_exec
    w = r.result
    assert "this machine" in w.cards.value and "holding layers" in w.cards.value
    assert all(e in w.cards.value for e in cluster.nodes)
    w.close()
    r = sh.run_cell("%cluster add nonsense")
    assert isinstance(r.error_in_exec, WorkbenchError)
    r = sh.run_cell("%cluster frobnicate")
    assert isinstance(r.error_in_exec, WorkbenchError)
    r = sh.run_cell("%cluster stop-local")
    assert r.success and not cluster.local_workers()


def test_a_node_speaking_another_protocol_version(cluster):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():  # answers HELLO as a protocol 6 server would
        conn, _ = listener.accept()
        conn.recv(64)
        reply = bytes([6, 1, 0, 0]) + bytes(P._CAPS)
        conn.sendall(len(reply).to_bytes(8, "little") + reply)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(P.NodeError, match="speaks RPC protocol 6.1.0") as e:
        cluster.add([f"127.0.0.1:{listener.getsockname()[1]}"])
    assert "same llama-cpp-python version" in e.value.hint
    listener.close()


def test_cluster_commands_without_what_they_need(cluster):
    with pytest.raises(WorkbenchError, match="is not in the cluster") as e:
        cluster.remove(["127.0.0.1:50052"])
    assert e.value.hint
    with pytest.raises(WorkbenchError, match="no model is loaded across the cluster") as e:
        cluster.rebalance()
    assert "--cluster" in e.value.hint
    with pytest.raises(WorkbenchError, match="start 1 to 8 local workers"):
        cluster.start_local(0)
    assert not cluster.nodes and not cluster.local_workers()
