"""The server extension's REST API against a real jupyter_server, with and without
authentication, fed by a real engine's status file and by broken ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from workbench.engine import status
from workbench.labext import handlers as h
from workbench.labext.handlers import routes

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"workbench.labext": True}}}


@pytest.fixture
def status_dir(tmp_path, monkeypatch):
    folder = tmp_path / "engines"
    folder.mkdir()
    monkeypatch.setenv("WORKBENCH_STATUS_DIR", str(folder))
    return folder


async def _get(jp_fetch, *parts, method="GET", **kwargs):
    body = b"" if method == "POST" else None
    r = await jp_fetch("workbench", *parts, method=method, body=body, raise_error=False,
                       **kwargs)
    is_json = r.headers.get("Content-Type", "").startswith("application/json")
    return r.code, (json.loads(r.body) if is_json else r.body)


def _entry(folder: Path, engine_id: str, **fields) -> Path:
    me = psutil.Process()
    entry = {"version": 1, "id": engine_id, "created": time.time(), "kernel_pid": me.pid,
             "kernel_started": me.create_time(), "kernel_id": None, "worker_pid": None,
             "state": "no model", "model": None, "placement": None,
             "memory": {"worker_rss_bytes": None, "worker_gpu_bytes": None}, "requests": 0,
             "last_tps": None, "last_ttft_s": None, "history": [], "restarts": 0,
             "last_crash": None, "updated": time.time(), **fields}
    path = folder / f"{engine_id}.json"
    path.write_text(json.dumps(entry))
    return path


def _gone_pid() -> tuple[int, float]:
    """The pid and start time of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


# ---- authentication ---------------------------------------------------------------------

def _workbench_rules(app) -> list:
    """Every route the server serves under /workbench/, whoever registered it."""
    found = []
    for rule in app.web_app.default_router.rules:
        for sub in getattr(rule.target, "rules", []):
            pattern = sub.matcher.regex.pattern
            if "/workbench/" in pattern:
                found.append((pattern, sub.target))
    return found


async def test_every_endpoint_refuses_unauthenticated_requests(jp_serverapp, jp_base_url,
                                                              http_server_client, status_dir):
    rules = _workbench_rules(jp_serverapp)
    assert len(rules) == len(routes(jp_base_url)) >= 4
    _entry(status_dir, "e1")
    paths = {h.EnginesHandler: "engines", h.EngineHandler: "engines/e1",
             h.StopHandler: "engines/e1/stop", h.ModelsHandler: "models"}
    checked = 0
    for pattern, handler in rules:
        assert handler in paths, f"a new route {pattern}: add it to this test"
        path = paths[handler]
        methods = [m for m in ("get", "post", "put", "patch", "delete")
                   if m in vars(handler)]
        assert methods, f"{handler.__name__} serves nothing"
        for method in methods:
            for headers in ({}, {"Authorization": "token wrong-token"}):
                r = await http_server_client.fetch(
                    f"{jp_base_url}workbench/{path}", method=method.upper(), headers=headers,
                    body=b"" if method in ("post", "put", "patch") else None,
                    raise_error=False)
                assert r.code == 403, (method, path, headers, r.code)
                checked += 1
    assert checked >= 8
    # and the engine was not stopped by any of them
    assert not (status_dir / "e1.stop").exists()


async def test_authenticated_empty_state(jp_fetch, status_dir):
    code, body = await _get(jp_fetch, "engines")
    assert code == 200 and body["engines"] == []


async def test_models_lists_the_default_model(jp_fetch, status_dir, default_model):
    code, body = await _get(jp_fetch, "models")
    assert code == 200
    first = body["models"][0]
    assert first["source"] == "default" and first["path"] == str(default_model)
    assert first["quantization"] == "Q4_1" and first["size"] == default_model.stat().st_size
    assert first["load"] == "%load_model"


# ---- a real engine -------------------------------------------------------------------------

async def test_a_real_engine_is_listed_and_stopped(jp_fetch, loaded, monkeypatch):
    import workbench
    from workbench import api

    monkeypatch.setenv("WORKBENCH_STATUS_DIR", str(api.session().publisher.folder))
    workbench.chat("Say hello.", max_tokens=8, temperature=0)
    engine_id = api.session().publisher.id
    api.session().publisher.publish()
    code, body = await _get(jp_fetch, "engines")
    assert code == 200
    mine = [e for e in body["engines"] if e["id"] == engine_id]
    assert len(mine) == 1
    e = mine[0]
    assert e["state"] == "idle" and e["model"]["quantization"] == "Q4_1"
    assert e["placement"]["device"] == "cpu" and e["placement"]["threads"] >= 1
    assert e["worker_pid"] == loaded.pid and e["memory"]["worker_rss_bytes"] > 0
    assert e["requests"] >= 1 and e["last_tps"] > 0 and e["history"]

    code, one = await _get(jp_fetch, "engines", engine_id)
    assert code == 200 and one["id"] == engine_id

    code, body = await _get(jp_fetch, "engines", engine_id, "stop", method="POST")
    assert code == 202 and body["forced"] is False
    assert not loaded.alive and loaded.model is None
    code, one = await _get(jp_fetch, "engines", engine_id)
    assert one["state"] == "stopped"
    assert workbench.status().state == "stopped from the Workbench panel"
    with pytest.raises(workbench.WorkbenchError, match="no model is loaded"):
        workbench.chat("again", max_tokens=4)


# ---- bad input -------------------------------------------------------------------------------

async def test_unknown_engine_ids_get_404(jp_fetch, status_dir):
    for parts in (("engines", "nope"), ("engines", "nope", "stop"),
                  ("engines", "..%2F..%2Fetc%2Fpasswd"), ("engines", "a" * 200)):
        method = "POST" if parts[-1] == "stop" else "GET"
        code, body = await _get(jp_fetch, *parts, method=method)
        assert code == 404, parts
    assert list(status_dir.iterdir()) == []


async def test_malformed_status_files_are_ignored(jp_fetch, status_dir):
    _entry(status_dir, "good")
    (status_dir / "notjson.json").write_text("{not json")
    (status_dir / "list.json").write_text("[1, 2]")
    (status_dir / "binary.json").write_bytes(b"\xff\xfe\x00")
    (status_dir / "empty.json").write_text("")
    _entry(status_dir, "oldversion", version=0)
    _entry(status_dir, "badpid", kernel_pid="123")
    _entry(status_dir, "otherid", id="someone-else")
    (status_dir / "bad name.json").write_text("{}")
    (status_dir / "a-folder.json").mkdir()
    for _ in range(3):  # the same answer every time: no loop of errors
        code, body = await _get(jp_fetch, "engines")
        assert code == 200
        assert [e["id"] for e in body["engines"]] == ["good"]
    for bad in ("notjson", "list", "binary", "empty", "oldversion", "badpid", "otherid"):
        code, _ = await _get(jp_fetch, "engines", bad)
        assert code == 404, bad


async def test_stale_entries_are_cleaned_up(jp_fetch, status_dir):
    pid, started = _gone_pid()
    stale = _entry(status_dir, "stale", kernel_pid=pid, kernel_started=started)
    (status_dir / "stale.stop").write_text("{}")
    # a live pid that another process took since: its start time gives it away
    reused = _entry(status_dir, "reused", kernel_started=psutil.Process().create_time() - 1e5)
    live = _entry(status_dir, "live")
    code, body = await _get(jp_fetch, "engines")
    assert code == 200 and [e["id"] for e in body["engines"]] == ["live"]
    assert not stale.exists() and not reused.exists() and live.exists()
    assert not (status_dir / "stale.stop").exists()

    pid, started = _gone_pid()
    _entry(status_dir, "stale2", kernel_pid=pid, kernel_started=started)
    code, _ = await _get(jp_fetch, "engines", "stale2", "stop", method="POST")
    assert code == 404 and not (status_dir / "stale2.json").exists()


_UNRESPONSIVE_KERNEL = textwrap.dedent("""
    import json, os, subprocess, sys, time, psutil
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    me = psutil.Process()
    entry = {"version": 1, "id": "busy", "created": time.time(), "kernel_pid": me.pid,
             "kernel_started": me.create_time(), "kernel_id": None,
             "worker_pid": worker.pid, "state": "generating", "model": None,
             "placement": None, "memory": {}, "requests": 0, "last_tps": None,
             "last_ttft_s": None, "history": [], "restarts": 0, "last_crash": None}
    path = os.path.join(sys.argv[1], "busy.json")
    with open(path + ".tmp", "w") as f:
        json.dump(entry, f)
    os.replace(path + ".tmp", path)
    print(worker.pid, flush=True)
    print(worker.wait(), flush=True)   # never reads its stop request
    time.sleep(120)
""")


async def test_stop_reaches_the_worker_of_a_kernel_that_does_not_answer(jp_fetch, status_dir):
    kernel = subprocess.Popen([sys.executable, "-c", _UNRESPONSIVE_KERNEL, str(status_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(kernel.stdout.readline())
        code, body = await _get(jp_fetch, "engines", "busy", "stop", method="POST")
        assert code == 202 and body["forced"] is True
        assert kernel.stdout.readline().strip() == str(-15)  # the worker got SIGTERM
        assert (status_dir / "busy.stop").exists()  # the kernel obeys once it is free
        assert not psutil.pid_exists(worker_pid) or \
            psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
    finally:
        kernel.kill()
        kernel.wait()
    code, _ = await _get(jp_fetch, "engines", "busy")
    assert code == 404 and not (status_dir / "busy.json").exists()


async def test_stop_never_signals_a_process_that_is_not_the_kernels_child(jp_fetch,
                                                                          status_dir):
    # the entry names a live kernel (our parent) and, as its worker, a process that is
    # not that kernel's child: it must not be signalled
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        parent = psutil.Process(os.getppid())
        _entry(status_dir, "forged", state="generating", worker_pid=other.pid,
               kernel_pid=parent.pid, kernel_started=parent.create_time())
        code, body = await _get(jp_fetch, "engines", "forged", "stop", method="POST")
        assert code == 202 and body["forced"] is False
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_status_files_are_replaced_atomically(tmp_path):
    path = tmp_path / "x.json"
    status.write_json_atomic(path, {"a": 1})
    status.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
