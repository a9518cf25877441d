"""Autotune: measure candidate configurations, keep every measurement.

Each run is stored in a SQLite database ($WORKBENCH_HOME/tuning.sqlite) keyed by
the machine's fingerprint, the model's sha256, the llama.cpp version and the
configuration, so a later load on the same machine reuses what was measured.
A database that cannot be read is moved aside and rebuilt, never a crash.
"""

from __future__ import annotations

import html
import json
import os
import sqlite3
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .. import _paths

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    device TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    llama_cpp TEXT NOT NULL,
    config TEXT NOT NULL,
    n_gpu_layers INTEGER NOT NULL,
    threads INTEGER NOT NULL,
    pp_tps REAL NOT NULL,
    tg_tps REAL NOT NULL,
    rss_bytes INTEGER,
    gpu_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS runs_key ON runs (device, model_sha256, llama_cpp);
CREATE TABLE IF NOT EXISTS calibration (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    device TEXT NOT NULL,
    llama_cpp TEXT NOT NULL,
    target TEXT NOT NULL,
    predicted_bytes INTEGER NOT NULL,
    residual_bytes INTEGER NOT NULL
);
"""
# Settings that make two runs comparable (the rest do not change speed).
KEY_SETTINGS = ("n_gpu_layers", "threads", "n_ctx", "n_batch", "n_ubatch", "flash_attn",
                "type_k", "type_v", "tensor_split")


class TuningDB:
    """The measurements of autotune runs on this machine."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else _paths.home() / "tuning.sqlite"
        self.rebuilt_from: Path | None = None
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            self.rebuilt_from = aside
            warnings.warn(f"the tuning database {self.path} could not be read ({e}); it was "
                          f"moved to {aside.name} and a new one started. Earlier autotune "
                          "measurements are not used.", RuntimeWarning, stacklevel=2)
            self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10)
        try:
            conn.executescript(_SCHEMA)
            conn.execute("SELECT count(*) FROM runs").fetchone()
            ok = conn.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        self._conn.close()

    def add(self, device: str, model_sha256: str, llama_cpp: str, config: dict[str, Any],
            pp_tps: float, tg_tps: float, rss_bytes: int | None = None,
            gpu_bytes: int | None = None) -> None:
        key = {k: config.get(k) for k in KEY_SETTINGS}
        with self._conn:
            self._conn.execute(
                "INSERT INTO runs (created, device, model_sha256, llama_cpp, config, n_gpu_layers,"
                " threads, pp_tps, tg_tps, rss_bytes, gpu_bytes) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (time.time(), device, model_sha256, llama_cpp, json.dumps(key, sort_keys=True),
                 int(config.get("n_gpu_layers") or 0), int(config.get("threads") or 0),
                 pp_tps, tg_tps, rss_bytes, gpu_bytes))

    def runs(self, device: str, model_sha256: str, llama_cpp: str) -> list[dict[str, Any]]:
        cur = self._conn.execute(
            "SELECT created, config, n_gpu_layers, threads, pp_tps, tg_tps, rss_bytes, gpu_bytes "
            "FROM runs WHERE device=? AND model_sha256=? AND llama_cpp=? ORDER BY id",
            (device, model_sha256, llama_cpp))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row, strict=True)) | {"config": json.loads(row[1])}
                for row in cur]

    def measured_models(self, device: str, llama_cpp: str) -> set[str]:
        """The sha256 of every model with runs on this machine and llama.cpp version."""
        cur = self._conn.execute("SELECT DISTINCT model_sha256 FROM runs WHERE device=? AND "
                                 "llama_cpp=?", (device, llama_cpp))
        return {row[0] for row in cur}

    def add_calibration(self, device: str, llama_cpp: str, target: str, predicted: int,
                        residual: int) -> None:
        """Record how far an uncorrected prediction (bytes) was from the measured peak."""
        with self._conn:
            self._conn.execute(
                "INSERT INTO calibration (created, device, llama_cpp, target, predicted_bytes,"
                " residual_bytes) VALUES (?,?,?,?,?,?)",
                (time.time(), device, llama_cpp, target, int(predicted), int(residual)))

    def correction(self, device: str, llama_cpp: str, target: str, last: int = 5) -> int:
        """Median residual (measured - predicted, bytes) of the last calibrations; 0 if none."""
        rows = [r[0] for r in self._conn.execute(
            "SELECT residual_bytes FROM calibration WHERE device=? AND llama_cpp=? AND target=?"
            " ORDER BY id DESC LIMIT ?", (device, llama_cpp, target, last))]
        if not rows:
            return 0
        rows.sort()
        return rows[len(rows) // 2]

    def best(self, device: str, model_sha256: str, llama_cpp: str,
             n_ctx: int | None = None) -> dict[str, Any] | None:
        """The configuration with the fastest decoding (best of its runs), if any."""
        best: dict[str, Any] | None = None
        for r in self.runs(device, model_sha256, llama_cpp):
            if n_ctx is not None and r["config"].get("n_ctx") not in (None, n_ctx):
                continue
            if best is None or r["tg_tps"] > best["tg_tps"]:
                best = r
        return best


@dataclass
class TuneResult:
    """Autotune's measurements (one row per configuration, best of its repeats)."""
    model: str
    rows: list[dict[str, Any]]
    best: dict[str, Any]

    def figure(self) -> Any:
        """Decode tokens/s against threads, one line per number of GPU layers."""
        import plotly.graph_objects as go

        fig = go.Figure(layout=go.Layout(
            title={"text": f"Autotune: {self.model}", "font": {"size": 13}}, height=320,
            xaxis={"title": {"text": "threads"}, "dtick": 1},
            yaxis={"title": {"text": "decode tokens/s"}, "rangemode": "tozero"}))
        for ngl in sorted({r["n_gpu_layers"] for r in self.rows}):
            pts = sorted((r["threads"], r["tg_tps"]) for r in self.rows
                         if r["n_gpu_layers"] == ngl)
            fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                            name=f"{ngl} GPU layers")
        return fig

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("GPU layers", "threads", "prompt t/s",
                                                   "decode t/s", "worker MiB", ""))
        body = "".join(
            f"<tr><td>{r['n_gpu_layers']}</td><td>{r['threads']}</td>"
            f"<td>{r['pp_tps']:,.1f}</td><td>{r['tg_tps']:,.1f}</td>"
            f"<td>{(r['rss_bytes'] or 0) / 2**20:,.0f}</td>"
            f"<td>{'best' if r is self.best else ''}</td></tr>" for r in self.rows)
        return (f"<b>Autotune of {html.escape(self.model)}</b>"
                f"<table><tr>{head}</tr>{body}</table>")

    def __repr__(self) -> str:
        lines = [f"Autotune of {self.model}",
                 "GPU layers  threads  prompt t/s  decode t/s"]
        lines += [f"{r['n_gpu_layers']:>10}  {r['threads']:>7}  {r['pp_tps']:>10.1f}  "
                  f"{r['tg_tps']:>10.1f}{'  best' if r is self.best else ''}" for r in self.rows]
        return "\n".join(lines)


def candidates(n_layers: int, max_gpu_layers: int, cores: int, logical: int,
               threads: Iterable[int] | None = None,
               gpu_layers: Iterable[int] | None = None) -> list[tuple[int, int]]:
    """(n_gpu_layers, threads) pairs worth measuring."""
    if threads is None:
        t = {max(1, cores // 2), cores}
        if logical > cores:
            t.add(logical)  # hyper-threads: rarely faster, worth one look
        threads = sorted(t)
    if gpu_layers is None:
        if max_gpu_layers <= 0:
            gpu_layers = [0]
        else:
            steps = {0, max_gpu_layers, max_gpu_layers // 2, (3 * max_gpu_layers) // 4,
                     max(0, max_gpu_layers - 1)}
            gpu_layers = sorted(steps)
    return [(g, t) for g in gpu_layers for t in threads]


def autotune(path: Path, *, threads: Iterable[int] | None, n_gpu_layers: Iterable[int] | None,
             n_prompt: int, n_gen: int, repeats: int, progress: bool,
             settings: dict[str, Any]) -> TuneResult:
    """See `workbench.autotune`."""
    import psutil

    from .. import api
    from ..errors import WorkbenchError
    from ..models.hashing import file_sha256
    from ..progress import progress_bar
    from .profile import fingerprint, usable_cores

    for name, values in (("threads", threads), ("n_gpu_layers", n_gpu_layers)):
        if values is not None and (not list(values) or any(int(v) < 0 for v in values)
                                   or (name == "threads" and 0 in list(values))):
            raise WorkbenchError(f"autotune {name} must be a non-empty list of "
                                 f"{'positive' if name == 'threads' else 'non-negative'} "
                                 f"integers (got {values!r})",
                                 f"For example {name}=[1, 2].")
    for name, v in (("n_prompt", n_prompt), ("n_gen", n_gen), ("repeats", repeats)):
        if int(v) < 1:
            raise WorkbenchError(f"autotune {name} must be at least 1 (got {v!r})",
                                 f"Pass {name}=1 or more.")
    base = api.plan(path, **settings)
    max_ngl = base.settings["n_gpu_layers"]
    from ..models.inspect import inspect_model

    m = inspect_model(path)
    pairs = candidates(m.n_layers, max_ngl, usable_cores(), psutil.cpu_count() or 1,
                       threads, n_gpu_layers)
    too_many = [g for g, _ in pairs if g > max_ngl]
    if too_many:
        raise WorkbenchError(f"{max(too_many)} GPU layers do not fit here (the planner fits "
                             f"at most {max_ngl})", f"Use n_gpu_layers up to {max_ngl}.")
    fixed = {k: v for k, v in settings.items() if k not in ("n_gpu_layers", "threads")}
    fixed.setdefault("n_ctx", base.settings["n_ctx"])
    fixed["kv_cache"] = "off"  # every run computes its whole prompt
    first = 1000 if m.n_vocab > 2000 else 0
    prompt = [first + (i * 7919) % max(1, m.n_vocab - first) for i in range(n_prompt)]
    device, sha = fingerprint(), file_sha256(path)
    version = api.engine().worker.llama_cpp_version
    db = TuningDB()
    best_of: dict[tuple[int, int], dict[str, Any]] = {}
    bar = progress_bar(f"Autotune {path.name}", enabled=progress)
    done, total = 0, len(pairs) * repeats
    try:
        for _ in range(repeats):  # in turn, so slow moments of a noisy machine spread out
            for ngl, t in pairs:
                loaded = api.load_model(path, progress=False, n_gpu_layers=ngl, threads=t,
                                        **fixed)
                c = api.generate(prompt, max_tokens=n_gen, temperature=0.0, ignore_eos=True)
                met = c.metrics
                config = {k: getattr(loaded.info, k, None) for k in KEY_SETTINGS}
                config.update(n_gpu_layers=ngl, threads=t,
                              n_ubatch=loaded.info.n_ubatch, flash_attn=loaded.info.flash_attn)
                db.add(device, sha, version, config, met.prompt_tps, met.decode_tps,
                       met.peak_rss_bytes or met.rss_bytes, met.gpu_bytes)
                row = {"n_gpu_layers": ngl, "threads": t, "pp_tps": met.prompt_tps,
                       "tg_tps": met.decode_tps, "rss_bytes": met.rss_bytes}
                if (ngl, t) not in best_of or row["tg_tps"] > best_of[(ngl, t)]["tg_tps"]:
                    best_of[(ngl, t)] = row
                done += 1
                bar(done / total)
    finally:
        db.close()
    rows = [best_of[p] for p in pairs]
    best = max(rows, key=lambda r: r["tg_tps"])
    bar.close(f"best: {best['n_gpu_layers']} GPU layers, {best['threads']} threads, "
              f"{best['tg_tps']:,.1f} tokens/s")
    keep = {k: v for k, v in settings.items() if k not in ("n_gpu_layers", "threads")}
    api.load_model(path, progress=False, n_gpu_layers=best["n_gpu_layers"],
                   threads=best["threads"], **keep)
    return TuneResult(model=path.name, rows=rows, best=best)
