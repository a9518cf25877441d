"""`workbench report`: the benchmark-report notebook run headless through papermill and a
real kernel, on the committed results and on benchmarks that run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workbench import report

pytestmark = pytest.mark.timeout(600)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench.cli", "report", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=500)


@pytest.fixture
def bench_dir(tmp_path):
    """A benchmarks folder of small real scripts: one that works, one that fails."""
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "_helper.py").write_text("")  # helpers are not benchmarks
    (folder / "tiny.py").write_text(textwrap.dedent("""
        import json, os, sys
        from pathlib import Path
        quick = "--quick" in sys.argv
        out = Path(os.environ["WORKBENCH_BENCH_RESULTS"])
        out.mkdir(parents=True, exist_ok=True)
        data = {"benchmark": "tiny", "params": {"quick": quick},
                "machine": {"cpu": "test"}, "result": {"speedup": 1.5, "runs": 3}}
        (out / "tiny.json").write_text(json.dumps(data))
        print("working...")
        print("RESULT speedup=1.500 runs=3 mode=" + ("quick" if quick else "full"))
    """))
    (folder / "broken.py").write_text("import sys\nprint('about to fail')\nsys.exit(3)\n")
    return folder


def test_parse_result_reads_the_last_result_line():
    out = "RESULT a=1\nnoise\nRESULT x=0.500 n=4 name=cpu big=1e3 gone=none\n"
    assert report.parse_result(out) == {"x": 0.5, "n": 4, "name": "cpu", "big": 1000.0,
                                        "gone": "none"}
    assert report.parse_result("no result here") == {}


def test_report_of_the_committed_results(tmp_path, default_model):
    out = tmp_path / "sub" / "report.html"
    kept = tmp_path / "executed.ipynb"
    r = _cli("--committed", "--benchmarks", "engine_overhead,kv_cache,placement",
             "--out", str(out), "--notebook", str(kept))
    assert r.returncode == 0, r.stdout + r.stderr
    page = out.read_text()
    from workbench.models.hashing import file_sha256

    assert file_sha256(default_model) in page           # the model's provenance
    assert "llama_cpp_python" in page and "cores_physical" in page
    for name in ("engine_overhead", "kv_cache", "placement"):
        assert f"<h2 id='{name}'>" in page
    assert page.count("Plotly.newPlot") == 3            # one chart each ...
    assert page.count("plotly.js v") == 1               # ... and plotly.js embedded once
    assert "<script src=" not in page                   # nothing fetched from elsewhere
    nb = json.loads(kept.read_text())
    assert any("parameters" in c["metadata"].get("tags", []) for c in nb["cells"])
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_report_runs_benchmarks_and_records_failures(tmp_path, bench_dir):
    out = tmp_path / "report.html"
    r = _cli("--benchmarks", "tiny,broken", "--out", str(out),
             env={"WORKBENCH_BENCHMARKS": str(bench_dir)})
    assert r.returncode == 1
    assert "some benchmarks failed: broken" in r.stderr
    page = out.read_text()
    assert "speedup" in page and "1.5" in page and "quick" in page
    assert "This benchmark failed" in page and "about to fail" in page
    # the results went next to the report, not into the benchmarks folder
    assert json.loads((tmp_path / "report-results" / "tiny.json").read_text())["result"]
    assert not (bench_dir / "results").exists()

    r = _cli("--benchmarks", "tiny", "--full", "--out", str(out),
             env={"WORKBENCH_BENCHMARKS": str(bench_dir)})
    assert r.returncode == 0, r.stderr
    assert "full" in out.read_text()


@pytest.mark.parametrize("args, message", [
    (["--benchmarks", "nope"], "no benchmark named 'nope'"),
    (["--benchmarks", ","], "no benchmark was named"),
    (["--benchmarks", "_provenance"], "no benchmark named '_provenance'"),
    (["--out", "{tmp}"], "is a folder"),
    (["--out", "/proc/no/report.html"], "cannot write to /proc/no"),
])
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = _cli("--committed", *args)
    assert r.returncode == 1
    assert message in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_half_report(tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    target.write_text("the previous report")

    class Boom(Exception):
        pass

    def explode(*a, **k):
        raise Boom

    monkeypatch.setattr(os, "replace", explode)
    with pytest.raises(Boom):
        report.write_html(target, "<html>new</html>")
    assert target.read_text() == "the previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_available_benchmarks_are_the_scripts(tmp_path):
    names = report.available()
    assert {"engine_overhead", "kv_cache", "placement", "finetune"} <= set(names)
    assert not any(n.startswith("_") for n in names)
    assert Path(report.NOTEBOOK).exists()
