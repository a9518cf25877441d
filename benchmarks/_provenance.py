"""What every benchmark result records about where and how it ran."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# WORKBENCH_BENCH_RESULTS sends results elsewhere (the benchmark report does, so a quick
# run never replaces the committed numbers)
RESULTS = Path(os.environ.get("WORKBENCH_BENCH_RESULTS") or Path(__file__).parent / "results")


def sha256(path: str | os.PathLike) -> str:
    from workbench.models.hashing import file_sha256

    return file_sha256(path)


_watch: Any = None  # the thermal watch of this benchmark run (power/meter.Sampler)


def machine() -> dict[str, Any]:
    """The machine, and (from this first call on) a thermal watch over the run: its
    verdict goes into every result this process writes."""
    global _watch
    from workbench.device.provenance import machine as _machine

    if _watch is None:
        from workbench.power.meter import Sampler

        _watch = Sampler(period_s=0.5).start()
    return _machine(system_info=True)


def thermal() -> dict[str, Any] | None:
    """Power, temperatures and throttling seen since `machine()` was first called (a
    throttled run is flagged, so it is never quoted as the machine's speed), and, where
    the engine's requests were metered, their joules per generated token."""
    if _watch is None:
        return None
    out = _watch.report().as_dict()
    from workbench import api

    # the energy of each request this process ran through the engine, where metered
    engine = api.session().started_engine
    recs = [r for r in (engine.records if engine is not None else [])
            if r.energy_j is not None]
    tokens = sum(r.generated_tokens for r in recs)
    if tokens:
        out["requests_metered"] = len(recs)
        out["joules_per_token"] = round(sum(r.energy_j for r in recs) / tokens, 4)
    return out


def scratch(prefix: str) -> Path:
    """A temporary folder for a benchmark's files (quantized copies, adapters, services),
    removed when the benchmark exits: repeated runs do not fill the disk."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def write(name: str, data: dict[str, Any]) -> Path:
    """Write results/NAME.json atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    data = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **data}
    watch = thermal()
    if watch is not None and "thermal" not in data:
        data["thermal"] = watch
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def result_line(values: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return "RESULT " + " ".join(f"{k}={fmt(v)}" for k, v in values.items())
