"""The engine's status file, as the kernel side writes it (the server side's reading is
tested in tests/labext/)."""

from __future__ import annotations

import json
import os
import time

import pytest

import workbench
from workbench.engine import status
from workbench.engine.client import Engine


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_an_engine_publishes_and_removes_its_entry(tmp_path):
    e = Engine()
    pub = status.StatusPublisher(e, tmp_path)
    try:
        assert _wait_for(pub.path.exists)
        entry = status.read_entry(pub.id, tmp_path)
        assert entry["state"] == "stopped" and entry["kernel_pid"] == os.getpid()
        assert entry["model"] is None and entry["worker_pid"] is None
        assert status.list_entries(tmp_path) == [entry]
    finally:
        pub.close()
        e.close()
    assert list(tmp_path.iterdir()) == []


def test_the_process_engine_publishes_its_model(loaded):
    from workbench import api

    workbench.chat("Hi", max_tokens=4, temperature=0)
    pub = api.session().publisher

    def current():
        entry = status.read_entry(pub.id, pub.folder) or {}
        return entry.get("requests") == len(loaded.records) and entry["state"] == "idle"

    assert _wait_for(current), (status.read_entry(pub.id, pub.folder, clean=False),
                                len(loaded.records), loaded.activity())
    entry = status.read_entry(pub.id, pub.folder)
    assert entry["worker_pid"] == loaded.pid
    assert entry["model"]["name"] == loaded.model.name
    assert entry["placement"]["n_ctx"] == loaded.model.n_ctx
    assert entry["history"][-1]["tps"] == pytest.approx(entry["last_tps"])


def test_an_unwritable_status_folder_does_not_stop_the_engine(tmp_path, loaded):
    # a folder under a plain file cannot be made, whoever the user is (root included)
    (tmp_path / "a-file").write_text("")
    pub = status.StatusPublisher(loaded, tmp_path / "a-file" / "engines")
    try:
        pub.publish()
        assert pub._thread.is_alive()
        assert workbench.chat("Hi", max_tokens=3, temperature=0).text
    finally:
        pub.close()


def test_a_live_kernel_is_not_stale_when_the_boot_time_moves():
    # the boot time (and so every start time) moves as the clock is adjusted, and by a
    # whole second as /proc/stat's btime rounds: a live kernel's entry must stay
    me = os.getpid()
    started = status._process_started(me)
    for moved in (-1.0000001, 1.0000001, 5.0, -30.0):
        assert not status.is_stale({"kernel_pid": me, "kernel_started": started + moved})
    assert status.is_stale({"kernel_pid": me, "kernel_started": started - 1e5})  # pid reused


def test_a_status_file_the_engine_did_not_write_is_not_read_as_its(tmp_path):
    e = Engine()
    pub = status.StatusPublisher(e, tmp_path)
    try:
        assert _wait_for(pub.path.exists)
        forged = json.loads(pub.path.read_text())
        (tmp_path / "other.json").write_text(json.dumps(forged))  # id does not match name
        assert [x["id"] for x in status.list_entries(tmp_path)] == [pub.id]
    finally:
        pub.close()
        e.close()
