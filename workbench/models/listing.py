"""`%models`: the catalog and the models on this machine in one table, with what fits.

"Fits" comes from the planner: for a file on this machine, from its GGUF header; for a
catalog variant not yet downloaded, from the catalog's shape and file size (marked as
an estimate). Where autotune measured a model on this machine, its best decode speed.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError
from .catalog import Entry, Variant
from .discover import LocalModel
from .gguf_file import GGML_TYPES
from .inspect import ModelInspection

# bits per weight of each quantization's main tensor type (ggml block sizes)
_MAIN_TYPE = {"Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K",
              "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K"}


def bits_per_weight(quant: str) -> float:
    name = _MAIN_TYPE.get(quant, quant)
    for tname, block, size in GGML_TYPES.values():
        if tname == name:
            return size * 8 / block
    raise WorkbenchError(f"unknown quantization {quant}", "See workbench/models/catalog.py.")


def estimated_inspection(e: Entry, v: Variant) -> ModelInspection | None:
    """A ModelInspection built from the catalog (shape, parameters, file size), for a
    file not on this machine; None when the catalog lacks the shape."""
    s = e.shape
    if s is None or (v.size is None and e.params is None):
        return None
    bpw = bits_per_weight(v.quant)
    emb = int(s.n_vocab * s.n_embd * bpw / 8)
    out = 0 if s.tied_embeddings else emb
    total = v.size if v.size is not None else int((e.params or 0) * bpw / 8)
    per_layer = max(0, (total - emb - out) // max(1, s.n_layers))
    return ModelInspection(
        path=Path(v.file), name=v.file, architecture=e.architecture or "?",
        quantization=v.quant, n_params=e.params or 0, file_bytes=total,
        n_layers=s.n_layers, n_ctx_train=e.context_length or 0, n_embd=s.n_embd, n_ff=0,
        n_head=s.n_head, n_vocab=s.n_vocab, layer_bytes=(per_layer,) * s.n_layers,
        input_bytes=emb, output_bytes=out, output_tied=s.tied_embeddings,
        kv_heads=(s.n_head_kv,) * s.n_layers, head_dim_k=s.head_dim, head_dim_v=s.head_dim,
        sliding_window=0, swa_layers=(False,) * s.n_layers, tensor_types={})


@dataclass(frozen=True)
class Row:
    name: str             # what `%load_model` takes
    family: str
    architecture: str
    quant: str
    size: int | None
    where: str            # a path, or "catalog" (not on this machine)
    fits: str = ""
    tokens_per_s: float | None = None
    note: str = ""


def describe_fit(place: Callable[[ModelInspection], Any], m: ModelInspection | None,
                 estimate: bool, size: int | None = None, room: int = 0,
                 rough: bool = False) -> str:
    """The planner's verdict in a few words. Without a shape, only the file's size can
    be compared with the most any one device may use (`room`, bytes)."""
    if m is None:
        if size is None:
            return "unknown (the catalog has neither its shape nor its size)"
        about = "about " if rough else ""  # a size from the parameter count
        gib = size / 2**30
        if size > room:
            return f"no: the weights alone are {about}{gib:,.2f} GiB"
        return (f"the weights ({about}{gib:,.2f} GiB) fit; the KV cache is unknown (no shape "
                "in the catalog)")
    try:
        p = place(m)
    except WorkbenchError as e:
        need = e.message.split("needs ", 1)[-1].split(" (")[0] if "needs " in e.message else ""
        return "no" + (f": needs {need}" if need else "")
    s = p.settings
    n = m.n_layers
    where = ("GPU" if s["n_gpu_layers"] > n else
             f"CPU + GPU ({s['n_gpu_layers']}/{n} layers)" if s["n_gpu_layers"] else "CPU")
    kv = "" if s["type_k"] == "f16" else f", {s['type_k']} KV"
    return f"yes: {where}, {s['n_ctx']:,} ctx{kv}" + (" (estimate)" if estimate else "")


class ModelTable:
    """Rows of `%models`; `rows` holds them."""

    columns = ("name", "family", "arch", "quant", "size", "where", "fits", "tokens/s", "note")

    def __init__(self, rows: list[Row], title: str) -> None:
        self.rows, self.title = rows, title

    def __len__(self) -> int:
        return len(self.rows)

    def _cells(self, r: Row) -> list[str]:
        return [r.name, r.family, r.architecture, r.quant,
                "unknown" if r.size is None else f"{r.size / 2**20:,.0f} MiB", r.where, r.fits,
                "" if r.tokens_per_s is None else f"{r.tokens_per_s:,.1f}", r.note]

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{c}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(v)}</td>"
                                        for v in self._cells(r)) + "</tr>" for r in self.rows)
        return (f"<b>{html.escape(self.title)}</b><table><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table>")

    def __repr__(self) -> str:
        rows = [list(self.columns)] + [self._cells(r) for r in self.rows]
        keep = [i for i in range(len(self.columns)) if any(r[i] for r in rows[1:])]
        widths = {i: max(len(r[i]) for r in rows) for i in keep}
        lines = ["  ".join(r[i].ljust(widths[i]) for i in keep).rstrip() for r in rows]
        return f"{self.title}\n" + "\n".join(lines)


def build_rows(entries: tuple[Entry, ...], local: list[LocalModel], *, family: str | None,
               local_only: bool, cached: Callable[[Variant], Path | None]) -> list[Row]:
    """Catalog variants (with their local copy, if any), then local models the catalog
    does not cover."""
    rows: list[Row] = []
    covered: set[Path] = set()
    for e in entries:
        if family and family.lower() not in (e.family.lower(), e.id):
            continue
        for v in e.variants:
            copy = cached(v)
            if copy is not None:
                covered.add(copy.resolve())
            if local_only and copy is None:
                continue
            rows.append(Row(f"{e.id}:{v.quant.lower()}", e.family,
                            e.architecture or "unknown", v.quant, v.size,
                            str(copy) if copy else "catalog"))
    for m in local:
        if m.path.resolve() in covered or (family and family.lower() not in m.name.lower()):
            continue
        rows.append(Row(m.name, m.source, m.architecture or "?", m.quantization or "?",
                        m.size, str(m.path), note=m.problem))
    return rows


def with_fits(rows: list[Row], entries: tuple[Entry, ...],
              place: Callable[[ModelInspection], Any],
              speed: Callable[[Path], float | None], room: int) -> list[Row]:
    from .inspect import inspect_model

    by_name = {f"{e.id}:{v.quant.lower()}": (e, v) for e in entries for v in e.variants}
    out = []
    for r in rows:
        if r.note:  # a file whose header failed
            out.append(r)
            continue
        if r.where != "catalog":
            try:
                m = inspect_model(r.where)
            except WorkbenchError as e:  # a damaged copy: say so on its row, list the rest
                out.append(replace(r, note=e.message))
                continue
            out.append(replace(r, fits=describe_fit(place, m, False), tokens_per_s=speed(
                Path(r.where))))
        else:
            e, v = by_name[r.name]
            size, rough = v.size, False
            if size is None and e.params:  # from the parameter count and the quantization
                size, rough = int(e.params * bits_per_weight(v.quant) / 8), True
            out.append(replace(r, fits=describe_fit(place, estimated_inspection(e, v), True,
                                                    size, room, rough)))
    return out


class UpdateTable:
    """`%models --updates`: local models with a newer revision on the Hub."""

    def __init__(self, updates: list[Any]) -> None:
        self.updates = updates

    def __len__(self) -> int:
        return len(self.updates)

    def _rows(self) -> list[tuple[str, str]]:
        return [(u.model.name, "; ".join(u.changed)) for u in self.updates]

    def _repr_html_(self) -> str:
        if not self.updates:
            return "<b>Every model from the Hub is up to date.</b>"
        body = "".join(f"<tr><td>{html.escape(n)}</td><td>{html.escape(c)}</td></tr>"
                       for n, c in self._rows())
        return ("<b>Updates on the Hub</b> (<code>workbench.update_model(NAME)</code> fetches "
                "one, verified; the old file stays)<table><thead><tr><th>model</th>"
                f"<th>what changed</th></tr></thead><tbody>{body}</tbody></table>")

    def __repr__(self) -> str:
        if not self.updates:
            return "Every model from the Hub is up to date."
        return "Updates on the Hub:\n" + "\n".join(f"{n}: {c}" for n, c in self._rows())
