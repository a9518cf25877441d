"""The model catalog: known models and their GGUF files on the Hugging Face Hub.

The entries live in `catalog.json` beside this module, as data (WORKBENCH_CATALOG can
name another file). A field nobody has
checked is null ("unknown"), never a guess. `validate()` checks the file's schema;
`workbench catalog validate` runs it from the command line.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError

CATALOG_FILE = Path(__file__).with_name("catalog.json")
SCHEMA = 1
QUANTS = ("F32", "BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M",
          "Q4_K_S", "Q4_1", "Q4_0", "IQ4_XS", "IQ4_NL", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
# `id:quant` picks a variant; with no quant, the first of these the entry has
DEFAULT_QUANTS = ("Q4_K_M", "Q4_0", "Q4_1", "Q8_0")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")  # fullmatch
_ID = re.compile(r"[a-z0-9][a-z0-9._-]*")
_SHA = re.compile(r"[0-9a-f]{64}")
_REVISION = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Shape:
    """What the planner needs besides the file size; from the model's config."""
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    tied_embeddings: bool


@dataclass(frozen=True)
class Variant:
    quant: str
    repo: str
    file: str
    revision: str | None     # a commit; None: the repository's newest
    size: int | None         # bytes
    sha256: str | None


@dataclass(frozen=True)
class Entry:
    id: str
    name: str
    family: str
    params: int | None
    architecture: str | None
    license: str | None
    context_length: int | None
    shape: Shape | None
    variants: tuple[Variant, ...]
    source: str              # where the facts were read

    def variant(self, quant: str | None = None) -> Variant:
        if quant is None:
            have = {v.quant: v for v in self.variants}
            return next((have[q] for q in DEFAULT_QUANTS if q in have), self.variants[0])
        for v in self.variants:
            if v.quant.lower() == quant.lower():
                return v
        raise WorkbenchError(
            f"{self.id} has no {quant} variant in the catalog",
            f"Its variants: {', '.join(v.quant for v in self.variants)} "
            f"(`%load_model {self.id}:{self.variants[0].quant.lower()}`).")


_MODEL_KEYS = {"id", "name", "family", "params", "architecture", "license", "context_length",
               "shape", "variants", "source"}
_VARIANT_KEYS = {"quant", "repo", "file", "revision", "size", "sha256"}


class _Checker:
    """Collects "where: what" problems."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def check(self, cond: bool, where: str, what: str) -> None:
        if not cond:
            self.problems.append(f"{where}: {what}")

    def obj(self, v: Any, where: str, keys: set[str]) -> bool:
        """Is `v` an object with no keys outside `keys`? Says what is wrong if not."""
        if not isinstance(v, dict):
            self.problems.append(f"{where}: must be an object")
            return False
        self.check(not set(v) - keys, where, f"unknown keys {sorted(set(v) - keys)}")
        return True

    def optional(self, v: Any, kind: type, where: str, name: str) -> None:
        if v is None:
            return
        if kind is int:
            self.check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, where,
                       f"{name} must be an integer ≥ 1 or null")
        else:
            self.check(isinstance(v, kind) and bool(v), where,
                       f"{name} must be a non-empty {kind.__name__} or null")


def validate(data: Any) -> list[str]:
    """What is wrong with catalog data (parsed JSON); empty when it is valid."""
    c = _Checker()
    if not isinstance(data, dict):
        return ["the catalog must be a JSON object"]
    c.check(data.get("schema") == SCHEMA, "catalog", f"schema must be {SCHEMA}")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        return c.problems + ["catalog: models must be a non-empty list"]
    seen: set[str] = set()
    for i, m in enumerate(models):
        if not c.obj(m, f"models[{i}]", _MODEL_KEYS):
            continue
        mid = m.get("id")
        where = f"models[{i}] ({mid!r})"
        c.check(not (_MODEL_KEYS - set(m)), where,
                f"missing keys {sorted(_MODEL_KEYS - set(m))} (write null for unknown)")
        if not isinstance(mid, str):
            c.problems.append(f"{where}: id must be a string")
            mid = repr(mid)
        c.check(bool(_ID.fullmatch(mid)) and ".." not in mid, where,
                "id must be lowercase letters, digits, '.', '_' or '-'")
        c.check(mid not in seen, where, "id is not unique")
        seen.add(mid)
        for key in ("name", "family", "source"):
            c.check(isinstance(m.get(key), str) and bool(m.get(key)), where, f"{key} is required")
        for key, kind in (("params", int), ("context_length", int), ("architecture", str),
                          ("license", str)):
            c.optional(m.get(key), kind, where, key)
        _check_shape(c, m.get("shape"), where)
        variants = m.get("variants")
        if not isinstance(variants, list) or not variants:
            c.problems.append(f"{where}: variants must be a non-empty list")
            continue
        quants = [str(v.get("quant")) for v in variants if isinstance(v, dict)]
        c.check(len(quants) == len(set(quants)), where, "a quant is listed twice")
        for j, v in enumerate(variants):
            _check_variant(c, v, f"{where} variants[{j}]")
    return c.problems


def _check_shape(c: _Checker, shape: Any, where: str) -> None:
    if shape is None:
        return
    want = set(Shape.__dataclass_fields__)
    if not c.obj(shape, f"{where} shape", want):
        return
    c.check(set(shape) == want, where, f"shape must have exactly {sorted(want)}")
    for k, v in shape.items():
        if k == "tied_embeddings":
            c.check(isinstance(v, bool), where, "shape.tied_embeddings must be true/false")
        else:
            c.check(v is not None, where, f"shape.{k} is required in a shape")
            c.optional(v, int, where, f"shape.{k}")


def _check_variant(c: _Checker, v: Any, where: str) -> None:
    if not c.obj(v, where, _VARIANT_KEYS):
        return
    c.check(not (_VARIANT_KEYS - set(v)), where,
            f"missing keys {sorted(_VARIANT_KEYS - set(v))} (write null for unknown)")
    c.check(isinstance(v.get("quant"), str) and v.get("quant") in QUANTS, where,
            f"quant must be one of {', '.join(QUANTS)}")
    repo = v.get("repo")
    c.check(isinstance(repo, str) and bool(_REPO.fullmatch(repo)) and ".." not in repo
            and "--" not in repo, where, "repo must be 'owner/name'")
    f = v.get("file")
    c.check(isinstance(f, str) and f.endswith(".gguf") and ".." not in f
            and not f.startswith("/") and "\\" not in f, where,
            "file must be a relative .gguf path inside the repository")
    rev = v.get("revision")
    c.check(rev is None or (isinstance(rev, str) and bool(_REVISION.fullmatch(rev))), where,
            "revision must be a 40-hex commit or null")
    c.optional(v.get("size"), int, where, "size")
    sha = v.get("sha256")
    c.check(sha is None or (isinstance(sha, str) and bool(_SHA.fullmatch(sha))), where,
            "sha256 must be 64 lowercase hex digits or null")


def _entry(m: dict[str, Any]) -> Entry:
    return Entry(id=m["id"], name=m["name"], family=m["family"], params=m.get("params"),
                 architecture=m.get("architecture"), license=m.get("license"),
                 context_length=m.get("context_length"),
                 shape=Shape(**m["shape"]) if m.get("shape") else None,
                 variants=tuple(Variant(quant=v["quant"], repo=v["repo"], file=v["file"],
                                        revision=v.get("revision"), size=v.get("size"),
                                        sha256=v.get("sha256")) for v in m["variants"]),
                 source=m["source"])


def load_catalog(path: str | os.PathLike | None = None) -> tuple[Entry, ...]:
    """The catalog's entries: `path`, else the file WORKBENCH_CATALOG names (a lab's own
    catalog), else the packaged one."""
    p = Path(path or os.environ.get("WORKBENCH_CATALOG") or CATALOG_FILE).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkbenchError(f"no catalog at {p}", "Check the path.") from None
    except ValueError as e:
        raise WorkbenchError(f"the catalog {p} is not valid JSON: {e}",
                             "Fix the file, then run `workbench catalog validate`.") from None
    problems = validate(data)
    if problems:
        raise WorkbenchError(f"the catalog {p} is not valid: " + "; ".join(problems[:5]),
                             "Run `workbench catalog validate` for the whole list.")
    return tuple(_entry(m) for m in data["models"])


def parse_spec(spec: str) -> tuple[str, str | None]:
    """"id[:quant]" -> (id, quant). Refuses what could name a path."""
    if ".." in spec or "/" in spec or "\\" in spec or spec.startswith("~"):
        raise WorkbenchError(f"{spec!r} is not a model id",
                             "Ids are names like qwen2.5-0.5b-instruct:q4_k_m; give a file as "
                             "a path ending in .gguf.")
    mid, _, quant = spec.partition(":")
    return mid.lower(), (quant or None)


def lookup(spec: str, entries: tuple[Entry, ...] | None = None) -> tuple[Entry, Variant]:
    """The catalog entry and variant `spec` ("id[:quant]") names."""
    entries = entries if entries is not None else load_catalog()
    mid, quant = parse_spec(spec)
    by_id = {e.id: e for e in entries}
    if mid not in by_id:
        raise unknown_model(spec, [e.id for e in entries])
    e = by_id[mid]
    return e, e.variant(quant)


def unknown_model(spec: str, names: list[str]) -> WorkbenchError:
    close = difflib.get_close_matches(spec.partition(":")[0].lower(), names, n=3, cutoff=0.5)
    return WorkbenchError(
        f"no model called {spec!r}: not a catalog id, a model on this machine or a file",
        (f"Did you mean {', '.join(close)}? " if close else "")
        + "`%models` lists the catalog and the models found on this machine.")
