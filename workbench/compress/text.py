"""Evaluation text that needs no download: English prose from the Python standard
library's own docstrings, in a fixed order. It changes only with the Python version,
which results record (with the text's sha256)."""

from __future__ import annotations

import hashlib
import importlib
import inspect

MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "difflib", "email.message",
           "fractions", "functools", "heapq", "http.client", "inspect", "itertools", "json",
           "logging", "pathlib", "shutil", "statistics", "string", "textwrap", "threading",
           "unittest", "urllib.parse", "zipfile")


def stdlib_text(min_chars: int = 0) -> str:
    """Module, class and function docstrings of MODULES, deduplicated, in order."""
    seen: set[str] = set()
    parts: list[str] = []
    for name in MODULES:
        mod = importlib.import_module(name)
        for obj in [mod] + [v for _, v in sorted(vars(mod).items())
                            if not _.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))
                            and getattr(v, "__module__", "") == mod.__name__]:
            doc = inspect.cleandoc(obj.__doc__ or "")
            if len(doc) > 80 and doc not in seen:
                seen.add(doc)
                parts.append(doc)
        if min_chars and sum(len(p) for p in parts) >= min_chars:
            break
    return "\n\n".join(parts)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
