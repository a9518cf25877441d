"""Autotune: measure candidate configurations and keep every measurement in the tuning
database (`tuning_db.py`), which later plans on this machine read; and the power cap's
choice among what was measured."""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable


from .tuning_db import KEY_SETTINGS, TuningDB

if TYPE_CHECKING:
    from ..session import Session

POWER_WINDOW_S = 2.0  # each candidate runs at least this long when its power is measured
SUSTAIN_S = 1.0       # ... in generations of about this long each

@dataclass
class TuneResult:
    """Autotune's measurements (one row per configuration, best of its repeats)."""
    model: str
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    power_cap: float | None = None
    idle_w: float | None = None
    notes: list[str] = field(default_factory=list)

    def figure(self) -> Any:
        """Decode tokens/s against threads, one line per number of GPU layers (and
        micro-batch, where several were tried)."""
        import plotly.graph_objects as go

        fig = go.Figure(layout=go.Layout(
            title={"text": f"Autotune: {self.model}", "font": {"size": 13}}, height=320,
            xaxis={"title": {"text": "threads"}, "dtick": 1},
            yaxis={"title": {"text": "decode tokens/s"}, "rangemode": "tozero"}))
        ubatches = {r.get("n_ubatch") for r in self.rows}
        for ngl, ub in sorted({(r["n_gpu_layers"], r.get("n_ubatch") or 0) for r in self.rows}):
            pts = sorted((r["threads"], r["tg_tps"]) for r in self.rows
                         if r["n_gpu_layers"] == ngl and (r.get("n_ubatch") or 0) == ub)
            name = f"{ngl} GPU layers" + (f", ubatch {ub}" if len(ubatches) > 1 else "")
            fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                            name=name)
        return fig

    def _cells(self, r: dict[str, Any]) -> list[str]:
        flags = []
        if r is self.best:
            flags.append("best" + (" under the cap" if self.power_cap else ""))
        if self.power_cap and r.get("power_p95_w") and r["power_p95_w"] > self.power_cap:
            flags.append("over the cap")
        if r.get("confirmed"):
            flags.append("confirmed by a second run")
        if r.get("throttled"):
            flags.append("throttled: " + "; ".join(r.get("throttle_why") or []))
        watts = (f"{r['power_w']:,.0f} / {r['power_p95_w']:,.0f}"
                 if r.get("power_w") is not None else "—")
        jpt = f"{r['joules_per_token']:,.3f}" if r.get("joules_per_token") is not None else "—"
        return [str(r["n_gpu_layers"]), str(r["threads"]), str(r.get("n_ubatch") or ""),
                f"{r['pp_tps']:,.1f}", f"{r['tg_tps']:,.1f}", watts, jpt, ", ".join(flags)]

    _HEAD = ("GPU layers", "threads", "ubatch", "prompt t/s", "decode t/s", "W mean / p95",
             "J/token", "")

    def _title(self) -> str:
        cap = (f" under a {self.power_cap:,.0f} W cap (idle draw {self.idle_w:,.1f} W)"
               if self.power_cap else "")
        return f"Autotune of {self.model}{cap}"

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in self._HEAD)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in self._cells(r))
                       + "</tr>" for r in self.rows)
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in self.notes)
        return (f"<b>{html.escape(self._title())}</b>"
                f"<table><tr>{head}</tr>{body}</table>{notes}")

    def __repr__(self) -> str:
        table = [list(self._HEAD)] + [self._cells(r) for r in self.rows]
        w = [max(len(row[i]) for row in table) for i in range(len(self._HEAD))]
        lines = [self._title()] + ["  ".join(c.rjust(w[i]) if i < 7 else c
                                             for i, c in enumerate(row)).rstrip()
                                   for row in table]
        return "\n".join(lines + self.notes)


def candidates(n_layers: int, max_gpu_layers: int, cores: int, logical: int,
               threads: Iterable[int] | None = None,
               gpu_layers: Iterable[int] | None = None,
               ubatches: Iterable[int] | None = None) -> list[tuple[int, int, int | None]]:
    """(n_gpu_layers, threads, n_ubatch) triples worth measuring (n_ubatch None: the
    planner's)."""
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
    ubs: list[int | None] = list(ubatches) if ubatches is not None else [None]
    return [(g, t, u) for g in gpu_layers for t in threads for u in ubs]


def _check_lists(**lists: Iterable[int] | None) -> None:
    from ..errors import WorkbenchError

    for name, values in lists.items():
        if values is None:
            continue
        vals = list(values)
        positive = name != "n_gpu_layers"
        if not vals or any(int(v) < (1 if positive else 0) for v in vals):
            raise WorkbenchError(f"autotune {name} must be a non-empty list of "
                                 f"{'positive' if positive else 'non-negative'} "
                                 f"integers (got {values!r})",
                                 f"For example {name}=[1, 2].")


def autotune(session: Session, path: Path, *, threads: Iterable[int] | None, n_gpu_layers: Iterable[int] | None,
             n_prompt: int, n_gen: int, repeats: int, progress: bool,
             settings: dict[str, Any], n_ubatch: Iterable[int] | None = None,
             power_cap: float | None = None) -> TuneResult:
    """See `workbench.autotune`."""
    import psutil

    from ..errors import WorkbenchError
    from ..models.hashing import file_sha256
    from ..progress import progress_bar
    from ..power import cap, meter
    from .calibrate import probe_tokens
    from .profile import fingerprint, usable_cores

    _check_lists(threads=threads, n_gpu_layers=n_gpu_layers, n_ubatch=n_ubatch)
    for name, v in (("n_prompt", n_prompt), ("n_gen", n_gen), ("repeats", repeats)):
        if int(v) < 1:
            raise WorkbenchError(f"autotune {name} must be at least 1 (got {v!r})",
                                 f"Pass {name}=1 or more.")
    final = dict(settings)  # the chosen configuration loads with these
    if power_cap is not None and final.get("set_gpu_power_limit"):
        final["power_cap"] = power_cap  # the GPU's limit is set to the cap
    settings = {k: v for k, v in settings.items()
                if k not in ("power_cap", "set_gpu_power_limit")}
    tel = meter.Telemetry()
    idle = None
    try:
        if power_cap is not None:
            idle = cap.check_cap(float(power_cap), tel)
        base = session.plan(path, **settings)
        max_ngl = base.settings["n_gpu_layers"]
        from ..models.inspect import inspect_model

        m = inspect_model(path)
        triples = candidates(m.n_layers, max_ngl, usable_cores(), psutil.cpu_count() or 1,
                             threads, n_gpu_layers, n_ubatch)
        too_many = [g for g, _, _ in triples if g > max_ngl]
        if too_many:
            raise WorkbenchError(f"{max(too_many)} GPU layers do not fit here (the planner "
                                 f"fits at most {max_ngl})", f"Use n_gpu_layers up to {max_ngl}.")
        fixed = {k: v for k, v in settings.items() if k not in ("n_gpu_layers", "threads")}
        fixed.setdefault("n_ctx", base.settings["n_ctx"])
        fixed["kv_cache"] = "off"  # every run computes its whole prompt
        prompt = probe_tokens(m.n_vocab, n_prompt)
        device, sha = fingerprint(), file_sha256(path)
        version = session.engine.worker.llama_cpp_version
        db = TuningDB()
        best_of: dict[tuple[int, int, int | None], dict[str, Any]] = {}
        done, total = 0, len(triples) * repeats
        bar = progress_bar(f"Autotune {path.name}", enabled=progress, unit="runs", total=total)

        def measure(ngl: int, t: int, ub: int | None, window: float = POWER_WINDOW_S) -> None:
            extra = {} if ub is None else {"n_ubatch": ub, "n_batch": max(ub, 512)}
            loaded = session.load(path, progress=False, n_gpu_layers=ngl, threads=t,
                                    **{**fixed, **extra})
            sampler = meter.Sampler(0.05, tel)
            if power_cap is None:
                sampler.start()  # the speed run is the whole measurement
            runs = [session.complete(prompt, max_tokens=n_gen, temperature=0.0,
                                 ignore_eos=True).metrics]
            generated = runs[0].generated_tokens
            if power_cap is not None:
                # The draw a cap must hold is that of sustained decoding: generations of
                # about a second each, since the gaps between short requests (the GPU
                # idle, waiting for the next) pull the draw under what a long answer keeps
                # up. The window starts once NVML's one-second mean has let go of the load.
                sustained = max(n_gen, min(int(runs[0].decode_tps * SUSTAIN_S),
                                           int(fixed["n_ctx"]) - len(prompt) - 8))
                sampler.start()
                t0, generated = time.monotonic(), 0
                while not generated or time.monotonic() - t0 < window + meter.NVML_MEAN_S:
                    runs.append(session.complete(prompt, max_tokens=sustained, temperature=0.0,
                                             ignore_eos=True).metrics)
                    generated += runs[-1].generated_tokens
            pw = sampler.stop()
            met = max(runs, key=lambda x: x.decode_tps)
            config = {k: getattr(loaded.info, k, None) for k in KEY_SETTINGS}
            config.update(n_gpu_layers=ngl, threads=t, n_ubatch=loaded.info.n_ubatch,
                          flash_attn=loaded.info.flash_attn)
            drawn = {"power_w": pw.mean_w, "power_p95_w": pw.p95_w,
                     "joules_per_token": pw.joules_per_token(generated),
                     "throttled": pw.throttled}
            db.add(device, sha, version, config, met.prompt_tps, met.decode_tps,
                   met.peak_rss_bytes or met.rss_bytes, met.gpu_bytes, drawn)
            row = {"n_gpu_layers": ngl, "threads": t, "n_ubatch": loaded.info.n_ubatch,
                   "pp_tps": met.prompt_tps, "tg_tps": met.decode_tps,
                   "rss_bytes": met.rss_bytes, **drawn, "throttle_why": pw.why}
            key = (ngl, t, ub)
            best_of[key] = _combine(best_of.get(key), row)

        try:
            for _ in range(repeats):  # in turn, so slow moments of a noisy machine spread out
                for ngl, t, ub in triples:
                    measure(ngl, t, ub)
                    done += 1
                    bar(done / total, done)
            if power_cap is not None:
                for extra_run in _search_under_cap(best_of, power_cap,
                                                   refine=n_gpu_layers is None):
                    if extra_run not in best_of:
                        triples.append(extra_run)
                        measure(*extra_run)
                    else:  # confirm the choice: twice as long, keeping the higher draw
                        measure(*extra_run, window=2 * POWER_WINDOW_S)
                        best_of[extra_run]["confirmed"] = True
        finally:
            db.close()
    finally:
        tel.close()
    rows = [best_of[k] for k in triples]
    notes = []
    if any(r["throttled"] for r in rows):
        notes.append("Some runs were throttled (marked): their speed is not this machine's, "
                     "and the planner does not use them.")
    pool = [r for r in rows if not r["throttled"]] or rows
    if power_cap is not None:
        under = [r for r in pool if _under(r, power_cap)]
        if not under:
            low = min(pool, key=lambda r: r["power_p95_w"] or float("inf"))
            bar.close("no configuration under the cap")
            raise WorkbenchError(
                f"no measured configuration of {path.name} stays under {power_cap:,.0f} W: the "
                f"lowest draw was {low['power_p95_w']:,.0f} W (95th percentile) with "
                f"{low['n_gpu_layers']} GPU layers and {low['threads']} threads; idle is "
                f"{idle:,.1f} W", f"Raise the cap above {low['power_p95_w']:,.0f} W"
                + (", or try fewer threads (threads=[1])." if low["threads"] > 1 else "."))
        pool = under
    best = max(pool, key=lambda r: r["tg_tps"])
    bar.close(f"best: {best['n_gpu_layers']} GPU layers, {best['threads']} threads, "
              f"{best['tg_tps']:,.1f} tokens/s"
              + (f", {best['power_p95_w']:,.0f} W" if best.get("power_p95_w") else ""))
    keep = {k: v for k, v in final.items() if k not in ("n_gpu_layers", "threads")}
    if best.get("n_ubatch") and n_ubatch is not None:
        keep.update(n_ubatch=best["n_ubatch"], n_batch=max(best["n_ubatch"], 512))
    session.load(path, progress=False, n_gpu_layers=best["n_gpu_layers"],
                   threads=best["threads"], **keep)
    return TuneResult(model=path.name, rows=rows, best=best, power_cap=power_cap, idle_w=idle,
                      notes=notes)


Key = tuple[int, int, "int | None"]


def _search_under_cap(best_of: dict[Key, dict[str, Any]], cap_w: float, refine: bool,
                      rounds: int = 12) -> Any:
    """What to measure next under a power cap (the caller measures each and updates
    `best_of`): a configuration not yet measured, or the current choice again to confirm it.

    Draw rises with the layers on the GPU, so between the best configuration under the
    cap and the next one measured above it (same threads and micro-batch) that went over,
    bisect on GPU layers (with `refine`). A choice is then run again, twice as long: a
    draw measured once, over a few seconds, varies by some 10% from run to run, and a
    choice at the edge of the cap would break it half the time."""
    for _ in range(rounds):
        under = [(k, r) for k, r in best_of.items() if _under(r, cap_w)]
        if not under:
            return
        (ngl, t, ub), best = max(under, key=lambda kr: kr[1]["tg_tps"])
        above = [k[0] for k, r in best_of.items() if k[1:] == (t, ub) and k[0] > ngl
                 and r["power_p95_w"] is not None and r["power_p95_w"] > cap_w]
        mid = (ngl + min(above)) // 2 if above else ngl
        if refine and mid != ngl and (mid, t, ub) not in best_of:
            yield mid, t, ub
        elif not best.get("confirmed"):
            yield ngl, t, ub
        else:
            return


def _under(r: dict[str, Any], cap_w: float) -> bool:
    """Whether a configuration's measured draw (95th percentile) stays under the cap, in
    runs the thermal watch did not flag."""
    return not r["throttled"] and r["power_p95_w"] is not None and r["power_p95_w"] <= cap_w


def _combine(kept: dict[str, Any] | None, run: dict[str, Any]) -> dict[str, Any]:
    """One configuration's runs as one: the fastest run (never a throttled one over one
    that was not), with the highest draw any of them saw."""
    if kept is None:
        return dict(run)
    faster = (not run["throttled"] if bool(run["throttled"]) != bool(kept["throttled"])
              else run["tg_tps"] > kept["tg_tps"])
    out = dict(run if faster else kept)
    for k in ("power_w", "power_p95_w"):
        seen = [x[k] for x in (kept, run) if x[k] is not None]
        out[k] = max(seen) if seen else None
    return out


@dataclass(frozen=True)
class Capped:
    """The measured configuration a power cap chose: settings for the planner to keep,
    and the rows that explain it."""
    settings: dict[str, Any]
    reasons: tuple[tuple[str, str, str], ...]


def under_cap(db: TuningDB, device: str, model_sha256: str, llama_cpp: str, model: str,
              cap_w: float, fixed: dict[str, Any]) -> Capped:
    """The fastest configuration measured on this machine whose draw (95th percentile)
    stays under `cap_w`, among those that agree with the settings the user fixed."""
    from ..errors import WorkbenchError
    from ..power import cap

    idle = cap.check_cap(cap_w)
    # one entry per configuration: its fastest run, and the highest draw any run of it saw
    by_config: dict[str, dict[str, Any]] = {}
    for r in db.runs(device, model_sha256, llama_cpp):
        if r["power_p95_w"] is None or r["throttled"] or not all(
                r["config"].get(k) == v for k, v in fixed.items()
                if k in ("n_gpu_layers", "threads", "n_ubatch")):
            continue
        key = json.dumps(r["config"], sort_keys=True)
        by_config[key] = _combine(by_config.get(key), r)
    runs = list(by_config.values())
    if not runs:
        raise WorkbenchError(
            f"no configuration of {model} has had its power measured on this machine, so "
            f"none can be chosen under {cap_w:,.0f} W",
            f"Measure them first: workbench.autotune({model!r}, power_cap={cap_w:g}) or "
            f"%profile_device --tune MODEL --power-cap {cap_w:g}.")
    under = [r for r in runs if _under(r, cap_w)]
    if not under:
        low = min(runs, key=lambda r: r["power_p95_w"])
        raise WorkbenchError(
            f"every measured configuration of {model} draws more than {cap_w:,.0f} W: the "
            f"lowest was {low['power_p95_w']:,.0f} W (95th percentile; {low['n_gpu_layers']} "
            f"GPU layers, {low['threads']} threads); idle is {idle:,.1f} W",
            "Raise the cap, or measure configurations that draw less: autotune with "
            "threads=[1] or fewer GPU layers.")
    best = max(under, key=lambda r: r["tg_tps"])
    cfg = best["config"]
    settings = {"n_gpu_layers": best["n_gpu_layers"], "threads": best["threads"]}
    if cfg.get("n_ubatch"):
        settings.update(n_ubatch=cfg["n_ubatch"], n_batch=max(cfg["n_ubatch"],
                                                              cfg.get("n_batch") or 512))
    jpt = best["joules_per_token"]
    why = (f"fastest of {len(under)} measured configurations under the cap (of {len(runs)}; "
           "each at the highest draw any of its runs saw): "
           f"{best['tg_tps']:,.1f} tokens/s at {best['power_p95_w']:,.0f} W p95"
           + (f", {jpt:,.3f} J/token" if jpt is not None else "")
           + f"; idle draw {idle:,.1f} W")
    return Capped(settings, (("power cap", f"{cap_w:,.0f} W", why),))
