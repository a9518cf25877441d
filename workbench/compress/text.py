"""Evaluation text that needs no download: English prose from the Python standard
library's own docstrings, in a fixed order. It changes only with the Python version,
which results record (with the text's sha256)."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings

# Calibration (layer ranking, FFN activations, distillation) reads other modules than
# evaluation does, so a model is never scored on the text it was fitted to.
CALIBRATION_MODULES = ("asyncio", "contextlib", "dataclasses", "enum", "gzip", "hashlib",
                       "ipaddress", "locale", "mailbox", "pickle", "pprint", "queue", "random",
                       "sched", "secrets", "selectors", "socket", "sqlite3", "subprocess",
                       "tarfile", "tempfile", "typing", "uuid", "weakref",
                       # more for distillation, which overfits a short text (appended, so
                       # the first 20,000 characters that rank layers stay the same)
                       "ast", "bisect", "calendar", "cmd", "codecs", "concurrent.futures",
                       "configparser", "copy", "dis", "doctest", "email.parser", "filecmp",
                       "fnmatch", "ftplib", "gettext", "glob", "graphlib", "html.parser",
                       "imaplib", "io", "mimetypes", "multiprocessing.pool", "numbers",
                       "optparse", "os", "pdb", "pkgutil", "platform", "plistlib", "poplib",
                       "pydoc", "re", "reprlib", "shelve", "shlex", "smtplib", "ssl",
                       "sysconfig", "tokenize", "trace", "traceback", "types",
                       "urllib.request", "wave", "webbrowser", "zipapp", "zoneinfo")
MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "difflib", "email.message",
           "fractions", "functools", "heapq", "http.client", "inspect", "itertools", "json",
           "logging", "pathlib", "shutil", "statistics", "string", "textwrap", "threading",
           "unittest", "urllib.parse", "zipfile")


def stdlib_text(min_chars: int = 0, modules: tuple[str, ...] = MODULES) -> str:
    """Module, class and function docstrings of `modules`, deduplicated, in order."""
    seen: set[str] = set()
    parts: list[str] = []
    with warnings.catch_warnings():  # reading some names warns (typing.io, ...)
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in modules:
            mod = importlib.import_module(name)
            objects = [mod] + [v for _, v in sorted(vars(mod).items())
                               if not _.startswith("_")
                               and (inspect.isclass(v) or inspect.isfunction(v))
                               and getattr(v, "__module__", "") == mod.__name__]
            for obj in objects:
                doc = inspect.cleandoc(obj.__doc__ or "")
                if len(doc) > 80 and doc not in seen:
                    seen.add(doc)
                    parts.append(doc)
            if min_chars and sum(len(p) for p in parts) >= min_chars:
                break
    return "\n\n".join(parts)


def calibration_text(min_chars: int = 0) -> str:
    """Text for fitting (ranking, activations, distillation): disjoint from stdlib_text."""
    return stdlib_text(min_chars, CALIBRATION_MODULES)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
