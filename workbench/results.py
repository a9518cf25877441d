"""Results that display themselves: as HTML in a notebook, as text elsewhere."""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import Any, Iterable

from ._tables import KeyValue, mib
from .engine.protocol import ModelInfo, RequestMetrics


class KVReport(KeyValue):
    """What a `%kv` command did, with the cache's state."""

    def __init__(self, title: str, data: dict[str, Any]) -> None:
        self.title = title
        self.data = data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def rows(self) -> list[tuple[str, Any]]:
        d = self.data
        rows: list[tuple[str, Any]] = []
        for s in d.get("sessions", []):
            note = "" if s.get("this_model", True) else " (another model or settings)"
            rows.append((f"session {s['name']}", f"{s['tokens']:,} tokens, "
                         f"{mib(s['file_bytes'])}{note}"))
        if "tokens" in d and "name" in d:
            rows.append((d["name"], f"{d['tokens']:,} tokens, {mib(d['file_bytes'])}"))
        if "ram_bytes" in d:
            rows += [
                ("RAM tier", f"{d['ram_entries']} entries, {mib(d['ram_bytes'])} of "
                             f"{mib(d['ram_budget'])}"),
                ("disk tier", f"{d['disk_entries']} entries, {mib(d['disk_bytes'])} of "
                              f"{mib(d['disk_budget'])}" if d["disk_on"] else "off"),
                ("hits", f"{d['hits_ram']} from RAM, {d['hits_disk']} from disk, "
                         f"{d['misses']} misses"),
                ("prompt tokens not recomputed", f"{d['tokens_saved']:,}"),
            ]
        return rows


def _draft(i: ModelInfo) -> str:
    if i.draft in ("off", "ngram", "auto"):
        return {"off": "off", "ngram": "n-gram lookup",
                "auto": "auto (n-gram lookup, where it pays)"}[i.draft]
    return (f"draft {Path(i.draft).name} ({i.draft_params / 1e6:,.1f} M parameters), "
            "with n-gram lookup")


class LoadedModel(KeyValue):
    """What `load_model` returns: the model and how it was placed."""

    title = "Model loaded"

    def __init__(self, info: ModelInfo, placement: Any = None) -> None:
        self.info = info
        self.placement = placement  # device.plan.Placement: the planner's reasons

    def __getattr__(self, name: str) -> Any:
        return getattr(self.info, name)

    def rows(self) -> list[tuple[str, Any]]:
        i = self.info
        return [("model", i.name), ("architecture", i.architecture),
                ("quantization", i.quantization), ("parameters", f"{i.n_params / 1e6:,.1f} M"),
                ("file", f"{i.file_bytes / 2**20:,.1f} MiB"), ("layers", i.n_layers),
                ("context", f"{i.n_ctx:,} tokens (trained {i.n_ctx_train:,})"),
                ("offloaded layers", f"{min(i.n_gpu_layers, i.n_layers)}"
                 f"{' + output' if i.n_gpu_layers > i.n_layers else ''} to "
                 f"{len(i.rpc_servers)} RPC node(s)")
                if i.rpc_servers else ("GPU layers", i.n_gpu_layers),
                ("threads", f"{i.threads}, re-chosen while decoding from the cores idle"
                 if i.adapt_threads else i.threads),
                ("KV cache", f"K {i.type_k}, V {i.type_v}: {i.kv_bytes_per_token:,} bytes/token, "
                             f"{i.kv_bytes_per_token * i.n_ctx / 2**20:,.0f} MiB at full context"),
                ("speculative decoding", _draft(i)),
                ("load time", f"{i.load_seconds:.2f} s"), ("path", i.path)] + (
            [("placement", self._placement())] if self.placement is not None else [])

    def _placement(self) -> str:
        p = self.placement
        if hasattr(p, "shares"):  # cluster.plan.ClusterPlan
            return "; ".join(f"{r[0]} layers {r[2]} ({r[3]})" for r in p.rows()) + \
                " (details: .placement)"
        where = "; ".join(f"{m.device} {m.total / 2**30:,.2f} GiB" for m in p.memory if m.total)
        return (f"predicted {where} (details: .placement)")


def _metrics_line(m: RequestMetrics) -> str:
    jpt = m.joules_per_token
    return (f"{m.generated_tokens} tokens · {m.decode_tps:,.1f} tok/s · "
            f"TTFT {m.ttft_s * 1000:,.0f} ms · prompt {m.prompt_tokens} tokens"
            + (f" ({m.cached_tokens} from the KV cache)" if m.cached_tokens else "")
            + f" at {m.prompt_tps:,.0f} tok/s"
            + (f" · {jpt:,.3f} J/token" if jpt is not None else "")
            + (f" · drafts {m.accepted_tokens}/{m.draft_tokens} accepted ({m.speculative})"
               if m.draft_tokens else "")
            + f" · {m.finish_reason}")


class Completion:
    """A finished generation: `text` and its `metrics`. `str()` gives the text."""

    def __init__(self, text: str, metrics: RequestMetrics | None, streamed: bool = False,
                 finish_reason: str | None = None) -> None:
        self.text = text
        self.metrics = metrics
        self.finish_reason = finish_reason or (metrics.finish_reason if metrics else None)
        self.parsed: Any = None  # the JSON answer, decoded, when a schema constrained it
        self.tool_calls: list[tuple[str, dict]] = []  # (name, arguments) the model called
        self.tool_results: list[tuple[str, dict, Any]] = []  # calls run, with their results
        # with logprobs=N: each generated token's TokenLogprob (token bytes, natural-log
        # probability, the N most likely tokens at its place)
        self.logprobs: tuple = ()
        self.token_ids: tuple[int, ...] = ()  # the generated tokens' ids
        # A streamed completion has already shown its text: display only the numbers.
        self._streamed = streamed

    def __str__(self) -> str:
        return self.text

    def parse(self, schema: Any) -> Any:
        """Decode the JSON answer a `schema` constrained into `parsed` and return it: an
        instance of `schema` where that is a pydantic model class, else plain JSON."""
        import json

        from .errors import GenerationError

        if self.finish_reason not in ("stop", "stop_string"):
            raise GenerationError(f"the answer ended ({self.finish_reason}) before its JSON "
                                  f"was complete: {self.text[:200]!r}",
                                  "Raise max_tokens, or ask for a smaller object.")
        self.parsed = schema.model_validate_json(self.text) \
            if hasattr(schema, "model_validate_json") else json.loads(self.text)
        return self.parsed

    def _footer(self) -> str:
        return _metrics_line(self.metrics) if self.metrics else (self.finish_reason or "")

    def __repr__(self) -> str:
        return self._footer() if self._streamed else f"{self.text}\n— {self._footer()}"

    def _repr_html_(self) -> str:
        foot = f"<div style='color:#777;font-size:85%'>{html.escape(self._footer())}</div>"
        if self._streamed:
            return foot
        return f"<div style='white-space:pre-wrap'>{html.escape(self.text)}</div>{foot}"


class MetricsTable:
    """Per-request metrics as a table; `records` holds them as dicts."""

    columns = ("request_id", "kind", "model", "prompt_tokens", "prompt_tps", "ttft_s",
               "generated_tokens", "decode_tps", "finish_reason", "rss_bytes", "gpu_bytes",
               "energy_j")

    def __init__(self, records: Iterable[RequestMetrics | dict[str, Any]]) -> None:
        self.records = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r)
                        for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.records[i]

    def column(self, name: str) -> list[Any]:
        return [r.get(name) for r in self.records]

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame.from_records(self.records)

    @staticmethod
    def _cell(name: str, v: Any) -> str:
        if v is None:
            return "—"
        if name.endswith("_bytes"):
            return mib(v)
        if name == "ttft_s":
            return f"{v * 1000:,.0f} ms"
        if isinstance(v, float):
            return f"{v:,.1f}"
        return str(v)

    def _rows(self) -> list[list[str]]:
        return [[self._cell(c, r.get(c)) for c in self.columns] for r in self.records]

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                       for row in self._rows())
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def __repr__(self) -> str:
        rows = [list(self.columns)] + self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.columns))]
        return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


class EngineStatus(KeyValue):
    title = "Workbench engine"

    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None

    def rows(self) -> list[tuple[str, Any]]:
        return [(k.replace("_", " "), "—" if v is None else v) for k, v in self.fields.items()]


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """Sentence embeddings, one L2-normalized row per input, in order: `vectors` is a
    float32 numpy array (n x dim), so the cosine similarity of two rows is their dot
    product. Works where an array does (`np.asarray(e)`, `e[0]`, `len(e)`)."""
    vectors: Any
    model: str
    pooling: str          # mean | cls | last, as the model declares
    prompt_tokens: int
    seconds: float        # the worker's time to embed them

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        return self.vectors if dtype is None else self.vectors.astype(dtype)

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, i: Any) -> Any:
        return self.vectors[i]

    def __repr__(self) -> str:
        n, dim = self.vectors.shape
        return (f"Embeddings({n} x {dim}, {self.model}, {self.pooling} pooling, "
                f"{self.prompt_tokens} tokens, {self.seconds * 1000:.0f} ms)")
