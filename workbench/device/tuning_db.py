"""The tuning database: every autotune run and calibration measured on this machine.

Runs are stored in SQLite ($WORKBENCH_HOME/tuning.sqlite) keyed by the machine's
fingerprint, the model's sha256, the llama.cpp version and the configuration, so a
later load on the same machine reuses what was measured. A database that cannot be
read is moved aside and rebuilt, never a crash.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

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
    gpu_bytes INTEGER,
    power_w REAL,
    power_p95_w REAL,
    joules_per_token REAL,
    throttled INTEGER
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
# Columns added after the first release: an older database gets them on open.
_ADDED = (("power_w", "REAL"), ("power_p95_w", "REAL"), ("joules_per_token", "REAL"),
          ("throttled", "INTEGER"))
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
            have = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            for name, kind in _ADDED:
                if name not in have:
                    conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
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
            gpu_bytes: int | None = None, power: dict[str, Any] | None = None) -> None:
        """`power`: power_w, power_p95_w, joules_per_token, throttled, where measured."""
        key = {k: config.get(k) for k in KEY_SETTINGS}
        pw = power or {}
        with self._conn:
            self._conn.execute(
                "INSERT INTO runs (created, device, model_sha256, llama_cpp, config, n_gpu_layers,"
                " threads, pp_tps, tg_tps, rss_bytes, gpu_bytes, power_w, power_p95_w,"
                " joules_per_token, throttled) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (time.time(), device, model_sha256, llama_cpp, json.dumps(key, sort_keys=True),
                 int(config.get("n_gpu_layers") or 0), int(config.get("threads") or 0),
                 pp_tps, tg_tps, rss_bytes, gpu_bytes, pw.get("power_w"), pw.get("power_p95_w"),
                 pw.get("joules_per_token"),
                 None if pw.get("throttled") is None else int(pw["throttled"])))

    def runs(self, device: str, model_sha256: str, llama_cpp: str) -> list[dict[str, Any]]:
        cur = self._conn.execute(
            "SELECT created, config, n_gpu_layers, threads, pp_tps, tg_tps, rss_bytes, gpu_bytes, "
            "power_w, power_p95_w, joules_per_token, throttled FROM runs "
            "WHERE device=? AND model_sha256=? AND llama_cpp=? ORDER BY id",
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
        """The configuration that decodes fastest, if any, judging each configuration by
        its latest run: the machine as it was last measured, not at its quietest (a run
        on a busy machine replaces an earlier, quieter one of the same configuration). A
        run the thermal watch flagged as throttled is not the machine's speed: left out."""
        latest: dict[str, dict[str, Any]] = {}
        for r in self.runs(device, model_sha256, llama_cpp):  # oldest first
            if n_ctx is not None and r["config"].get("n_ctx") not in (None, n_ctx):
                continue
            if r["throttled"]:
                continue
            latest[json.dumps(r["config"], sort_keys=True)] = r
        return max(latest.values(), key=lambda r: r["tg_tps"], default=None)
