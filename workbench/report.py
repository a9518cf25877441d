"""The benchmark report: run benchmarks from `benchmarks/`, then write one self-contained
HTML page (plots inline, plotly.js embedded) with the machine's provenance.

`notebooks/06-benchmark-report.ipynb` drives this (papermill parameters); `workbench report`
runs that notebook headless.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import _paths
from ._extras import DISTRIBUTION
from .errors import WorkbenchError

REPO = Path(__file__).resolve().parent.parent
# An installed wheel carries the benchmarks, their committed results, the report notebook
# and what the benchmarks read, laid out as in the repository (pyproject's force-include).
PACKAGED = Path(__file__).resolve().parent / "_data"


def _root() -> Path:
    """The repository's root when running from a checkout, else the wheel's copy."""
    if (REPO / "pyproject.toml").is_file() and (REPO / "benchmarks").is_dir():
        return REPO
    return PACKAGED


ROOT = _root()
NOTEBOOK = ROOT / "notebooks" / "06-benchmark-report.ipynb"
_RESULT = re.compile(r"^RESULT (.*)$", re.M)
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def benchmarks_dir() -> Path:
    folder = Path(os.environ.get("WORKBENCH_BENCHMARKS", ROOT / "benchmarks"))
    if not folder.is_dir():
        raise WorkbenchError(f"no benchmarks folder at {folder}",
                             "The installed package is incomplete (reinstall it), or point "
                             "WORKBENCH_BENCHMARKS at a checkout's benchmarks/ folder.")
    return folder


def available() -> list[str]:
    """The benchmarks that can be run: each `benchmarks/NAME.py` that is not a helper."""
    return sorted(p.stem for p in benchmarks_dir().glob("*.py") if _NAME.fullmatch(p.stem))


def check_names(names: Sequence[str]) -> list[str]:
    known = available()
    names = list(names)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise WorkbenchError(
            f"no benchmark named {', '.join(map(repr, unknown))}" if unknown
            else "no benchmark was named",
            f"Choose from: {', '.join(known)}.")
    return names


def parse_result(output: str) -> dict[str, Any]:
    """The key=value pairs of the last `RESULT ...` line (numbers as numbers)."""
    lines = _RESULT.findall(output)
    if not lines:
        return {}
    values: dict[str, Any] = {}
    for pair in lines[-1].split():
        key, _, raw = pair.partition("=")
        values[key] = raw
        for kind in (int, float):
            try:
                values[key] = kind(raw)
                break
            except ValueError:
                continue
    return values


@dataclasses.dataclass
class BenchmarkRun:
    name: str
    ok: bool
    seconds: float
    result: dict[str, Any]        # the RESULT line
    data: dict[str, Any] | None   # results/NAME.json, as the benchmark wrote it
    log_tail: str


def run_benchmark(name: str, results_dir: Path, *, quick: bool = True,
                  timeout_s: float = 1800, args: Sequence[str] = ()) -> BenchmarkRun:
    """Run `benchmarks/NAME.py` in its own process, its results going to `results_dir`."""
    script = benchmarks_dir() / f"{check_names([name])[0]}.py"
    results_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(script), *(["--quick"] if quick else []), *args]
    env = {**os.environ, "WORKBENCH_BENCH_RESULTS": str(results_dir),
           # what a benchmark builds (llama-bench) stays out of an installed package
           "WORKBENCH_BENCH_CACHE": os.environ.get("WORKBENCH_BENCH_CACHE") or str(
               script.parent / ".cache" if ROOT == REPO
               else _paths.home() / "cache" / "benchmarks"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(script.parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=timeout_s, cwd=script.parent.parent)
        output, ok = proc.stdout + proc.stderr, proc.returncode == 0
    except subprocess.TimeoutExpired as e:
        output = f"{e.stdout or ''}{e.stderr or ''}\n(stopped after {timeout_s:.0f} s)"
        ok = False
    seconds = time.monotonic() - start
    data = None
    written = results_dir / f"{name}.json"
    if written.exists():
        data = json.loads(written.read_text())
    result = parse_result(output)
    return BenchmarkRun(name, ok and bool(result), seconds, result, data,
                        "\n".join(output.splitlines()[-15:]))


def committed(name: str) -> BenchmarkRun | None:
    """A benchmark's committed result (benchmarks/results/NAME.json), if there is one."""
    path = benchmarks_dir() / "results" / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    # older results files keep their headline numbers under another key
    headline = next((data[k] for k in ("result", "worst_ratios", "ratios")
                     if isinstance(data.get(k), dict)), {})
    result = {k: v for k, v in headline.items() if isinstance(v, (int, float, str))}
    return BenchmarkRun(name, True, 0.0, result, data, "")


# ---- provenance --------------------------------------------------------------------------

def provenance(model: str | os.PathLike | None = None) -> dict[str, Any]:
    """The machine, the versions that matter, and the model file's sha256."""
    from .models.default import default_model_path
    from .models.hashing import file_sha256
    from .device.provenance import machine, package_version

    path = Path(model) if model else default_model_path()
    info = machine()
    info["ram"] = f"{info.pop('ram_bytes') / 2**30:.1f} GiB"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **info,
        "workbench": package_version(DISTRIBUTION),
        "torch": package_version("torch"),
        "model": path.name,
        "model_sha256": file_sha256(path),
    }


# ---- figures ------------------------------------------------------------------------------

def _bar(title: str, labels: list[str], values: list[float], unit: str) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=labels, y=values, text=[f"{v:.3g}" for v in values],
                           textposition="auto"))
    fig.update_layout(title=title, yaxis_title=unit, height=340,
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig


def _engine_overhead(d: dict) -> Any:
    m = d["medians"]
    labels = ["llama.cpp (llama-bench)", "llama-cpp-python", "workbench engine"]
    depth = d["params"].get("n_prompt", 512)
    values = [m["native"].get(f"tg{d['params'].get('n_gen', 128)}_d{depth}_tps", 0.0),
              m["llama_cpp_python"]["decode_tps"], m["workbench"]["decode_tps"]]
    return _bar(f"Decode speed at context depth {depth}", labels, values, "tokens/s")


def _kv_cache(d: dict) -> Any:
    import plotly.graph_objects as go

    t = d["ttft_median_s"]
    prefixes = list(t)
    fig = go.Figure()
    for key, label in (("ours_cold", "no cache"), ("ours_ram", "RAM tier hit"),
                       ("ours_disk", "disk tier hit")):
        fig.add_bar(name=label, x=[f"{p} tokens" for p in prefixes],
                    y=[t[p].get(key) for p in prefixes])
    fig.update_layout(title="Time to first token for a shared prefix", barmode="group",
                      yaxis_title="seconds", yaxis_type="log", height=340,
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig


def _placement(d: dict) -> Any:
    sweep = d["choice"]["sweep"]
    labels = [", ".join(f"{k}={v}" for k, v in s["settings"].items()) for s in sweep]
    return _bar("Decode speed of each configuration tried", labels,
                [s["tg_tps"] for s in sweep], "tokens/s")


_FIGURES: dict[str, Callable[[dict], Any]] = {
    "engine_overhead": _engine_overhead, "kv_cache": _kv_cache, "placement": _placement}


def figure(run: BenchmarkRun) -> Any:
    """A chart of the run: the benchmark's own view where there is one, else its RESULT."""
    if run.data is not None and run.name in _FIGURES:
        try:
            return _FIGURES[run.name](run.data)
        except (KeyError, TypeError, IndexError):
            pass  # an older or partial results file: fall back to the RESULT values
    numbers = {k: v for k, v in run.result.items() if isinstance(v, (int, float))}
    if not numbers:
        return None
    return _bar(f"{run.name}: RESULT", list(numbers), list(numbers.values()), "")


# ---- the page -------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 14px; }
th { background: #f3f3f3; }
.failed { color: #b00020; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 12px; }
"""


def table_html(rows: dict[str, Any]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                    for k, v in rows.items())
    return f"<table>{cells}</table>"


def rows_html(rows: list[dict[str, Any]]) -> str:
    """A table of records, one column per key (the quantizations a benchmark compared:
    size, speed, KL, top-1 and each task's accuracy with its 95% interval)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k in keys)
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) or "none"
    return "–" if v is None else str(v)


def render_html(runs: Sequence[BenchmarkRun], prov: dict[str, Any],
                title: str = "Workbench benchmark report") -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<h2>Machine and versions</h2>", table_html(prov)]
    plotly_js: str | bool = True  # embedded once, with the first chart
    for run in runs:
        parts.append(f"<h2 id='{run.name}'>{html.escape(run.name)}</h2>")
        if not run.ok:
            parts.append(f"<p class='failed'>This benchmark failed after {run.seconds:.0f} s."
                         f"</p><pre>{html.escape(run.log_tail)}</pre>")
            continue
        if run.seconds:
            parts.append(f"<p>Ran for {run.seconds:.0f} s.</p>")
        thermal = (run.data or {}).get("thermal") or {}
        if thermal.get("throttled"):
            parts.append("<p class='failed'>Throttled during this run ("
                         + html.escape("; ".join(thermal.get("why") or []))
                         + "): these numbers are not this machine's speed.</p>")
        parts.append(table_html(run.result))
        if run.data and run.data.get("quantizations"):
            parts.append(rows_html(run.data["quantizations"]))
        if run.data is not None:
            params = run.data.get("params") or {}
            machine = run.data.get("machine") or {}
            parts.append("<details><summary>parameters and the machine it recorded"
                         "</summary>" + table_html(params) +
                         table_html({k: v for k, v in machine.items()
                                 if k != "llama_cpp_system_info"}) + "</details>")
        fig = figure(run)
        if fig is not None:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=plotly_js))
            plotly_js = False
    parts.append("</body></html>")
    return "\n".join(parts)


def check_out(path: str | os.PathLike) -> Path:
    """Where the report goes: a file name in a folder that can be written (made if
    needed)."""
    from ._paths import check_writable

    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise WorkbenchError(f"{path} is a folder", "Give the report a file name, "
                             "for example report.html.")
    check_writable(path.parent, "Choose another place for the report.", create=True)
    return path


def write_html(path: str | os.PathLike, text: str) -> Path:
    """Write the page atomically: a failed run never leaves half a report."""
    from ._paths import write_text_atomic

    path = check_out(path)
    write_text_atomic(path, text)
    return path
