"""The Workbench panel in a real JupyterLab, driven by Playwright in Debian's headless
chromium: open the panel, load the default model from a notebook, see the engine
appear, insert a `%load_model` cell from the models view, stop the engine.

The screenshots land in `test-artifacts/` (or $WORKBENCH_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from workbench.serve.check import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("WORKBENCH_ARTIFACTS",
                                Path(__file__).resolve().parent.parent / "test-artifacts"))
# flags for a sandboxed CI machine with a closed network
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]

pytestmark = pytest.mark.timeout(600)

NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "%load_ext workbench\n%load_model default --n-ctx 2048"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "%%chat --temperature 0 --max-tokens 24\nName three colours."},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "import workbench\nfor n in range(6):\n"
                   "    workbench.chat(f'Count to {n + 3}.', max_tokens=16 + 8 * n)"},
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A real JupyterLab server on loopback, with its own runtime and status folders."""
    root = tmp_path_factory.mktemp("lab")
    (root / "panel.ipynb").write_text(json.dumps(NOTEBOOK))
    status_dir = tmp_path_factory.mktemp("engines")
    token, port = secrets.token_hex(16), free_port()
    env = {**os.environ, "WORKBENCH_STATUS_DIR": str(status_dir),
           "JUPYTER_RUNTIME_DIR": str(tmp_path_factory.mktemp("runtime"))}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
           f"--port={port}", f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.workspaces_dir={tmp_path_factory.mktemp('workspaces')}",
           "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                raise RuntimeError("JupyterLab did not start:\n" +
                                   (root / "lab.log").read_text()[-3000:])
            time.sleep(0.5)
    yield {"url": base, "token": token, "root": root, "status_dir": status_dir}
    proc.send_signal(signal.SIGTERM)  # the server shuts its kernels down, then exits
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def page(lab):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: `apt-get install chromium` "
                    "(`make test` installs it where it can)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        _shot(page, "workbench-panel-last.png")  # how the page was left, pass or fail
        context.close()
        browser.close()


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


def test_panel_shows_the_engine_a_notebook_starts(lab, page):
    from playwright.sync_api import expect

    page.goto(f"{lab['url']}/lab/tree/panel.ipynb?token={lab['token']}")
    # the notebook's kernel is up when the toolbar's status says idle
    expect(page.locator(".jp-Notebook")).to_be_visible(timeout=120_000)
    expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
           ).to_have_count(1, timeout=120_000)

    tab = page.locator(".jp-SideBar .lm-TabBar-tab[data-id='workbench-panel']")
    expect(tab).to_be_visible()
    tab.click()
    panel = page.locator("#workbench-panel")
    expect(panel).to_be_visible()
    expect(panel.locator(".jp-Workbench-empty")).to_contain_text(
        "No workbench engine is running")
    expect(page.locator(".jp-Workbench-status")).to_have_text("Workbench: no model")
    default = panel.locator(".jp-Workbench-modelItem[data-model='default']")
    expect(default).to_contain_text("Q4_1")

    # run the notebook: load the default model, then a chat
    page.locator(".jp-Notebook .jp-Cell").first.click()
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    card = panel.locator(".jp-Workbench-engine")
    expect(card).to_have_count(1, timeout=180_000)
    expect(card.locator(".jp-Workbench-model")).to_contain_text("SmolLM2-135M-Instruct")
    expect(card).to_have_attribute("data-state", "idle", timeout=180_000)
    expect(card.locator(".jp-Workbench-tps")).to_contain_text("tok/s", timeout=60_000)
    expect(card.locator(".jp-Workbench-facts")).to_contain_text("requests7",
                                                                 timeout=120_000)
    expect(card).to_contain_text("panel.ipynb")
    expect(card).to_contain_text("Q4_1")
    expect(card).to_contain_text("CPU")
    expect(page.locator(".jp-Workbench-status")).to_contain_text("SmolLM2-135M-Instruct")
    expect(page.locator(".jp-Workbench-status")).to_contain_text("tok/s")
    # the chat answered in the notebook
    expect(page.locator(".jp-Cell").nth(1).locator(
        ".jp-OutputArea-output[data-mime-type='text/html']")).to_contain_text(
            "tok/s", timeout=60_000)
    _shot(page, "workbench-panel.png")

    # the models view inserts a %load_model cell into the notebook
    cells = page.locator(".jp-Notebook .jp-Cell")
    before = cells.count()
    default.locator(".jp-Workbench-insert").click()
    expect(cells).to_have_count(before + 1)
    assert "%load_model" in page.locator(".jp-Notebook .jp-Cell.jp-mod-active"
                                         " .jp-InputArea-editor").inner_text()

    # Stop frees the model; the card says so and the status bar goes back to "no model"
    card.locator(".jp-Workbench-stop").click()
    expect(card).to_have_attribute("data-state", "stopped", timeout=60_000)
    expect(page.locator(".jp-Workbench-status")).to_have_text("Workbench: no model")
    entry_file = next(lab["status_dir"].glob("*.json"))
    entry = json.loads(entry_file.read_text())
    assert entry["state"] == "stopped" and entry["worker_pid"] is None
    _shot(page, "workbench-panel-stopped.png")

    # a kernel killed outright leaves its entry behind: the server cleans it up and the
    # panel goes back to its "no engine" state
    os.kill(entry["kernel_pid"], signal.SIGKILL)
    expect(panel.locator(".jp-Workbench-empty")).to_contain_text(
        "No workbench engine is running", timeout=30_000)
    assert not entry_file.exists()
    expect(page.locator(".jp-Workbench-error")).to_have_count(0)
