"""Task accuracy as a result: each task's scores with 95% intervals, lm-eval's own
results beside the workbench's provenance (model sha256, versions, machine), written
as one JSON file: lm-eval's keys as lm-eval writes them, plus "workbench"."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Z95 = 1.959964


def wilson(k: float, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of a proportion k/n."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + Z95 ** 2 / n
    mid = (p + Z95 ** 2 / (2 * n)) / d
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / d
    return (max(0.0, mid - half), min(1.0, mid + half))


@dataclass(frozen=True)
class Score:
    """One metric of one task. `low`/`high`: its 95% interval (Wilson, for proportions)."""
    task: str
    metric: str
    value: float
    n: int
    low: float | None = None
    high: float | None = None

    def interval(self) -> str:
        if self.low is None or self.high is None:
            return ""
        return f"{self.low:.3f}–{self.high:.3f}"


_PROPORTIONS = ("acc", "acc_norm", "exact_match")


def scores(results: dict[str, Any]) -> list[Score]:
    """The scores in lm-eval's results dict, each with its interval."""
    out = []
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        n = int(n_samples.get(task, {}).get("effective", metrics.get("sample_len", 0)) or 0)
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",")[0]
            low = high = None
            if metric in _PROPORTIONS and n:
                low, high = wilson(value * n, n)
            out.append(Score(task, metric, float(value), n, low, high))
    return out


@dataclass
class TaskResults:
    """What `eval_tasks` measured. `raw`: lm-eval's results dict; `provenance`: where
    and on what it was measured; `path`: the JSON file written."""
    model: str
    scores: list[Score]
    raw: dict[str, Any]
    provenance: dict[str, Any]
    path: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def score(self, task: str, metric: str | None = None) -> Score:
        """A task's score (its first metric unless `metric` is named)."""
        for s in self.scores:
            if s.task == task and (metric is None or s.metric == metric):
                return s
        raise KeyError(f"no {metric or 'score'} for {task}")

    def to_json(self) -> dict[str, Any]:
        from lm_eval.utils import handle_non_serializable

        data = json.loads(json.dumps(self.raw, default=handle_non_serializable))
        data["workbench"] = self.provenance
        return data

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")
        self.path = path
        return path

    def _rows(self) -> list[list[str]]:
        return [[s.task, s.metric, f"{s.value:.3f}", s.interval(), f"{s.n:,}"]
                for s in self.scores]

    def __repr__(self) -> str:
        head = f"Task accuracy of {self.model} ({self.seconds:.0f} s)"
        lines = [head] + ["  " + "  ".join(f"{c:<14}" for c in r) for r in self._rows()]
        if self.path:
            lines.append(f"  results and provenance: {self.path}")
        return "\n".join(lines + [f"  {n}" for n in self.notes])

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("task", "metric", "value", "95% interval", "n"))
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in self._rows())
        where = f"<p>Results and provenance: <code>{html.escape(str(self.path))}</code></p>" \
            if self.path else ""
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in self.notes)
        return (f"<b>Task accuracy of {html.escape(self.model)}</b> ({self.seconds:.0f} s)"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{where}"
                f"{notes}")
