"""Key-value tables that display themselves: HTML in a notebook, aligned text elsewhere."""

from __future__ import annotations

import html
from typing import Any, Sequence


def mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f} MiB"


def table_html(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                   f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def table_text(rows: Sequence[tuple[str, Any]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class KeyValue:
    title = ""

    def rows(self) -> list[tuple[str, Any]]:
        raise NotImplementedError

    def _repr_html_(self) -> str:
        return f"<b>{html.escape(self.title)}</b>{table_html(self.rows())}"

    def __repr__(self) -> str:
        return f"{self.title}\n{table_text(self.rows())}"
