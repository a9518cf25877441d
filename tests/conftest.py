"""Shared fixtures. Every user path goes to a temporary WORKBENCH_HOME, and the tests
run the real default model through the real worker process."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile

import pytest

# Before anything imports the workbench: keep the user's metrics log out of the tests.
os.environ["WORKBENCH_HOME"] = tempfile.mkdtemp(prefix="workbench-test-home-")
# ... and the engines' status files out of the user's Jupyter runtime directory.
os.environ["WORKBENCH_STATUS_DIR"] = tempfile.mkdtemp(prefix="workbench-test-status-")
# Both go when the run ends (their models, adapters and caches take a gigabyte or more).
for _scratch in (os.environ["WORKBENCH_HOME"], os.environ["WORKBENCH_STATUS_DIR"]):
    atexit.register(shutil.rmtree, _scratch, True)
# A shell without job control starts background commands with SIGINT ignored, and Python
# then installs no KeyboardInterrupt handler: the tests that interrupt a generation need it.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def default_model():
    from workbench.models.default import default_model_path

    return default_model_path()


@pytest.fixture()
def loaded(default_model):
    """The process's engine with the default model loaded (reused across tests)."""
    import workbench

    e = workbench.engine()
    if not (e.alive and e.model is not None and e.model.path == str(default_model)
            and e.model.n_ctx == 2048):
        workbench.load_model(progress=False, n_ctx=2048)
    return e


@pytest.fixture()
def busy_core():
    """Keep cores busy with other processes, as on a shared lab machine: all usable
    cores but one (one on a 2-core machine). Yields how many."""
    import subprocess
    import sys

    from workbench._cpu import usable_cores

    n = max(1, usable_cores() - 1)
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield n
    finally:
        for p in procs:
            p.kill()
            p.wait()
