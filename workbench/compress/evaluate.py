"""`workbench.evaluate`: the quality of model variants, measured as llama.cpp's
perplexity tool measures it, in a child process.

The text is cut into chunks of n_ctx tokens; each chunk is decoded from an empty
context, and the second half of its positions is scored (each of those has at least
n_ctx/2 tokens of context). For each scored position:
- perplexity: exp of the mean negative log-probability of the actual next token;
- against a reference model, on the same tokens: the KL divergence of the variant's
  next-token distribution from the reference's, and whether both put the same token
  first (top-1 agreement).
All models are loaded together and each chunk runs through all of them, so nothing
but the per-position numbers is kept.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import WorkbenchError
from ..models.gguf_file import read_header


@dataclass
class ModelQuality:
    path: Path
    quantization: str
    bytes: int
    perplexity: float
    kl_mean: float | None          # nats, against the reference; None for the reference
    kl_p99: float | None
    top1: float | None             # share of positions whose top token matches the reference's
    load_s: float
    pp_tps: float                  # prompt tokens/s while scoring
    tg_tps: float                  # tokens/s decoding one token at a time
    # task accuracy (compare(..., tasks=)): {task: (accuracy, 95% low, 95% high)}
    tasks: dict[str, tuple[float, float, float]] = field(default_factory=dict)


@dataclass
class Evaluation:
    """Per-model quality on one text; `rows[0]` is the reference when one was given."""
    rows: list[ModelQuality]
    reference: Path | None
    tokens_scored: int
    chunks: int
    n_ctx: int
    text_sha256: str
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, path: str | os.PathLike) -> ModelQuality:
        p = Path(path)
        return next(r for r in self.rows if r.path == p)

    def pareto(self, metric: str = "kl_mean") -> list[ModelQuality]:
        """The rows no other row beats on both size and `metric` (lower is better)."""
        rows = [r for r in self.rows if getattr(r, metric) is not None]
        return [r for r in rows if not any(
            o is not r and o.bytes <= r.bytes and getattr(o, metric) <= getattr(r, metric)
            and (o.bytes < r.bytes or getattr(o, metric) < getattr(r, metric)) for o in rows)]

    def figure(self, metric: str = "perplexity") -> Any:
        """Quality (`metric`: perplexity, kl_mean or top1) against file size, the Pareto
        front marked."""
        import plotly.graph_objects as go

        sign = -1 if metric == "top1" else 1
        rows = [r for r in self.rows if getattr(r, metric) is not None]
        front = {id(r) for r in self.pareto(metric) if sign > 0} if sign > 0 else {
            id(r) for r in rows if not any(o.bytes <= r.bytes and o.top1 > r.top1 for o in rows
                                           if o is not r)}
        fig = go.Figure()
        fig.add_trace(go.Scatter(
            x=[r.bytes / 2**20 for r in rows], y=[getattr(r, metric) for r in rows],
            mode="markers+text", text=[r.path.name for r in rows], textposition="top center",
            marker=dict(size=11, color=["#d62728" if id(r) in front else "#1f77b4"
                                        for r in rows]), name="models"))
        pts = sorted((r.bytes / 2**20, getattr(r, metric)) for r in rows if id(r) in front)
        if len(pts) > 1:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts],
                                     mode="lines", line=dict(dash="dot", color="#d62728"),
                                     name="Pareto front"))
        label = {"perplexity": "perplexity (lower is better)",
                 "kl_mean": "KL divergence from the reference (nats)",
                 "top1": "top-1 agreement with the reference"}[metric]
        fig.update_layout(title="Quality against size", xaxis_title="file size (MiB)",
                          yaxis_title=label, height=380, margin=dict(l=60, r=20, t=50, b=50))
        return fig

    def _table(self) -> list[list[str]]:
        tasks = list(dict.fromkeys(t for r in self.rows for t in r.tasks))
        head = ["model", "quant", "size", "perplexity", "KL (mean)", "KL (p99)", "top-1",
                "load", "pp t/s", "tg t/s"] + [f"{t} (95% CI)" for t in tasks]
        out = [head]
        for r in self.rows:
            acc = [r.tasks.get(t) for t in tasks]
            ref = self.reference is not None and r.path == self.reference
            out.append([r.path.name + (" (reference)" if ref else ""), r.quantization,
                        f"{r.bytes / 2**20:,.1f} MiB", f"{r.perplexity:.3f}",
                        "—" if r.kl_mean is None else f"{r.kl_mean:.5f}",
                        "—" if r.kl_p99 is None else f"{r.kl_p99:.4f}",
                        "—" if r.top1 is None else f"{r.top1:.2%}", f"{r.load_s:.2f} s",
                        f"{r.pp_tps:,.0f}", f"{r.tg_tps:,.1f}"]
                       + ["—" if a is None else f"{a[0]:.1%} ({a[1]:.0%}–{a[2]:.0%})" for a in acc])
        return out

    def __repr__(self) -> str:
        t = self._table()
        w = [max(len(r[i]) for r in t) for i in range(len(t[0]))]
        lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in t]
        return (f"{self.tokens_scored:,} tokens scored in {self.chunks} chunks of "
                f"{self.n_ctx}\n" + "\n".join(lines) + (f"\n{self.note}" if self.note else ""))

    def _repr_html_(self) -> str:
        import html

        t = self._table()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in t[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in t[1:])
        note = f"<p>{html.escape(self.note)}</p>" if self.note else ""
        return (f"<b>Quality: {self.tokens_scored:,} tokens scored in {self.chunks} chunks of "
                f"{self.n_ctx}</b><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
                f"</table>{note}")


def evaluate(models: Sequence[str | os.PathLike], reference: str | os.PathLike | None = None,
             text: str | None = None, *, n_ctx: int = 512, max_chunks: int = 8,
             threads: int | None = None, note: str = "",
             progress: Callable[[float], None] | None = None) -> Evaluation:
    """Perplexity of each model on `text` (default: Python standard library docstrings),
    and, with a `reference`, KL divergence and top-1 agreement against it."""
    from .._cpu import idle_cores
    from .. import _child
    from .text import stdlib_text, text_sha256

    paths = [Path(m).expanduser() for m in models]
    ref = Path(reference).expanduser() if reference is not None else None
    everything = ([ref] if ref else []) + [p for p in paths if p != ref]
    if not everything:
        raise WorkbenchError("no model to evaluate", "Give one or more .gguf paths.")
    vocab = None
    for p in everything:
        h = read_header(p)
        toks = h.metadata.get("tokenizer.ggml.tokens")
        n = getattr(toks, "length", None) or (len(toks) if isinstance(toks, list) else 0)
        if vocab is not None and n and n != vocab:
            raise WorkbenchError(f"{p.name} has a vocabulary of {n:,} tokens, the others "
                                 f"{vocab:,}", "KL and top-1 compare models of one tokenizer: "
                                 "variants of the same model.")
        vocab = n or vocab
    if n_ctx < 64 or n_ctx % 2:
        raise WorkbenchError(f"n_ctx={n_ctx} is too small or odd", "Use 512 or more.")
    text = text if text is not None else stdlib_text()
    rows, scored, chunks = _child.run(
        _evaluate_child, ([str(p) for p in everything], text, n_ctx, max_chunks,
                          threads or idle_cores().idle, ref is not None),
        "evaluating " + ", ".join(p.name for p in everything), progress)
    out = [ModelQuality(path=Path(r["path"]), quantization=read_header(r["path"]).quantization,
                        bytes=Path(r["path"]).stat().st_size, **{k: v for k, v in r.items()
                                                                  if k != "path"})
           for r in rows]
    return Evaluation(out, ref, scored, chunks, n_ctx, text_sha256(text), note)


def _evaluate_child(paths: list[str], text: str, n_ctx: int, max_chunks: int, threads: int,
                    with_reference: bool, report: Any) -> tuple[list[dict[str, Any]], int, int]:
    import llama_cpp as L
    import numpy as np

    from ._capture import fill, init_llama, load, tokenize

    keep = init_llama()
    loaded = []
    for p in paths:
        t0 = time.perf_counter()
        model, ctx = load(p, n_ctx, threads)
        loaded.append((p, model, ctx, time.perf_counter() - t0))
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(loaded[0][1]))
    tokens = tokenize(loaded[0][1], text)
    n_chunks = min(max_chunks, len(tokens) // n_ctx)
    if n_chunks < 1:
        raise WorkbenchError(f"the text has {len(tokens):,} tokens, fewer than one chunk of "
                             f"{n_ctx}", "Give a longer text or a smaller n_ctx.")
    first = n_ctx // 2
    batch = L.llama_batch_init(n_ctx, 0, 1)
    stats = [{"nll": 0.0, "kl": [], "agree": 0, "pp_s": 0.0} for _ in loaded]
    steps = n_chunks * len(loaded) + len(loaded)

    def decode(ctx: Any, toks: list[int], pos0: int, all_logits: bool) -> None:
        if L.llama_decode(ctx, fill(batch, toks, pos0, all_logits)) != 0:
            raise WorkbenchError("llama_decode failed while scoring", "Lower n_ctx.")

    def log_softmax(x: Any) -> Any:
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    done = 0
    for c in range(n_chunks):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        targets = np.array(chunk[first + 1:], dtype=np.int64)
        ref_logp = None
        for j, (_, _, ctx, _) in enumerate(loaded):
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            t0 = time.perf_counter()
            decode(ctx, chunk, 0, True)
            stats[j]["pp_s"] += time.perf_counter() - t0
            ptr = L.llama_get_logits(ctx)
            logits = np.ctypeslib.as_array(ptr, shape=(n_ctx, n_vocab))[first:n_ctx - 1]
            logp = log_softmax(logits.astype(np.float32))
            stats[j]["nll"] += float(-logp[np.arange(len(targets)), targets].sum())
            if with_reference and j == 0:
                ref_logp = logp
            elif ref_logp is not None:
                p_ref = np.exp(ref_logp)
                stats[j]["kl"].append((p_ref * (ref_logp - logp)).sum(axis=1))
                stats[j]["agree"] += int((ref_logp.argmax(axis=1) == logp.argmax(axis=1)).sum())
            done += 1
            report.progress(done / steps, done, steps, "passes")
    # decode speed: one token at a time after a short prompt, 32 tokens
    tg = []
    for _, _, ctx, _ in loaded:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        decode(ctx, tokens[:64], 0, False)
        t0 = time.perf_counter()
        for i in range(32):
            decode(ctx, [tokens[64 + i]], 64 + i, False)
        tg.append(32 / (time.perf_counter() - t0))
        done += 1
        report.progress(done / steps, done, steps, "passes")
    L.llama_batch_free(batch)
    scored = n_chunks * (n_ctx - 1 - first)
    rows = []
    for j, (p, model, ctx, load_s) in enumerate(loaded):
        kl = np.concatenate(stats[j]["kl"]) if stats[j]["kl"] else None
        rows.append({"path": p, "perplexity": math.exp(stats[j]["nll"] / scored),
                     "kl_mean": float(kl.mean()) if kl is not None else None,
                     "kl_p99": float(np.percentile(kl, 99)) if kl is not None else None,
                     "top1": stats[j]["agree"] / scored if kl is not None else None,
                     "load_s": load_s, "pp_tps": n_chunks * n_ctx / stats[j]["pp_s"],
                     "tg_tps": tg[j]})
        L.llama_free(ctx)
        L.llama_model_free(model)
    del keep
    return rows, scored, n_chunks
