"""Takes the README's screenshot: a real JupyterLab in headless Chromium runs
notebooks/01-quickstart.ipynb, then the dashboard and the streamed answer are captured.

    .venv/bin/python scripts/readme_screenshot.py [--out docs/quickstart.png]

Needs Debian's chromium (/usr/bin/chromium) and the playwright package.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "quickstart.png"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = dict(os.environ, WORKBENCH_HOME=tempfile.mkdtemp())
    lab = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=", "--ServerApp.password=",
         "--allow-root",
         f"--ServerApp.root_dir={ROOT / 'notebooks'}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update",
                      "--disable-sync"])
            page = browser.new_page(viewport={"width": 1400, "height": 1050})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/01-quickstart.ipynb")
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            page.wait_for_selector("text=Python 3 (ipykernel) | Idle", timeout=60_000)
            time.sleep(1)
            page.click("text=Run", timeout=10_000)
            page.click("text=Run All Cells", timeout=10_000)
            # every cell has run when the last prompt shows an execution count
            page.wait_for_function(
                "() => { const p = [...document.querySelectorAll('.jp-InputPrompt')];"
                " return p.length && /\\[\\d+\\]/.test(p[p.length - 1].textContent); }",
                timeout=180_000)
            time.sleep(2)
            no_news = page.get_by_role("button", name="No", exact=True)
            if no_news.count():
                no_news.first.click(timeout=5_000)
            page.locator(".jp-Cell").nth(4).evaluate("e => e.scrollIntoView()")
            time.sleep(1)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        lab.terminate()
        lab.wait(10)
    print(args.out)


if __name__ == "__main__":
    main()
