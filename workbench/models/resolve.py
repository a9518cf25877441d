"""What `%load_model NAME` loads. NAME is tried, in this order, as:

1. nothing or "default": the bundled default model;
2. a catalog id, `id` or `id:quant` (`qwen2.5-0.5b-instruct:q8_0`): a copy already on
   this machine if one is verified, else a download from the Hub. With no quant, a
   variant already here, else Q4_K_M (then Q4_0, Q4_1, Q8_0);
3. the name of a model found on this machine (`%models --local`): its listed name
   (`ollama:llama3.2:1b`, `org/repo/file.gguf`) or its file name;
4. a path to a GGUF file.

Something written as a path (starting with /, ./, ../ or ~) is taken as a path at
once. A name that is none of these gets the closest ids and names as a hint; a name
with '..' in it is refused (a path may have it: it says where it goes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..errors import WorkbenchError
from .catalog import DEFAULT_QUANTS, Entry, Variant, load_catalog, lookup, unknown_model
from .discover import discover, find_local, hf_cache_dir


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", "\\")) or Path(spec).is_absolute()


def cached_copy(v: Variant) -> Path | None:
    """The variant's file in the Hugging Face cache: from the catalog's revision when it
    pins one, else from the snapshot refs/main names, else the newest that holds it. With
    a sha256 in the catalog, only a copy that matches it (a snapshot of another revision
    may hold another file under the same name)."""
    from .hashing import file_sha256

    repo_dir = hf_cache_dir() / f"models--{v.repo.replace('/', '--')}"
    snaps = repo_dir / "snapshots"
    if v.revision:
        names = [v.revision]
    else:
        try:
            main = (repo_dir / "refs" / "main").read_text().strip()
        except OSError:
            main = ""
        found = [p for p in snaps.glob("*") if p.is_dir()]
        names = [p.name for p in sorted(found, key=lambda p: (p.name != main,
                                                              -p.stat().st_mtime))]
    for rev in names:
        f = snaps / str(rev) / v.file
        if f.is_file() and (v.sha256 is None or file_sha256(f) == v.sha256):
            return f
    return None


def from_bundle(v: Variant) -> Path | None:
    """The bundled default model, when the variant is that very file."""
    from .default import default_model_path
    from .hashing import file_sha256

    try:
        p = default_model_path()
    except WorkbenchError:
        return None
    if v.sha256 and p.stat().st_size == (v.size or -1) and file_sha256(p) == v.sha256:
        return p
    return None


def from_catalog(e: Entry, v: Variant, progress: Callable[[float], None] | None) -> Path:
    """A verified local copy of the variant (the bundled file, or one in the cache),
    else a download."""
    from .fetch import download

    return from_bundle(v) or cached_copy(v) or download(v, progress=progress)


def resolve(spec: str | os.PathLike | None,
            progress: Callable[[float], None] | None = None) -> Path:
    from .default import default_model_path

    if spec is None or str(spec) in ("", "default"):
        return default_model_path()
    s = str(spec)
    if isinstance(spec, os.PathLike) or _looks_like_path(s):
        return Path(s).expanduser()
    entries = load_catalog()
    if ".." not in s and "/" not in s and s.partition(":")[0].lower() in {e.id for e in entries}:
        e, v = lookup(s, entries)
        if ":" not in s:  # no quantization named: one already here, before a download
            order = sorted(e.variants, key=lambda w: (DEFAULT_QUANTS.index(w.quant)
                                                      if w.quant in DEFAULT_QUANTS else 99))
            v = next((w for w in order if from_bundle(w) or cached_copy(w)), v)
        return from_catalog(e, v, progress)
    found = discover()
    local = find_local(s, found)  # refuses '..'
    if local is not None:
        return local.path
    if Path(s).is_file():  # a relative path, from the notebook's folder
        return Path(s)
    if s.endswith(".gguf") and os.sep in s:
        return Path(s)  # a path to a missing file: the load says "not found"
    raise unknown_model(s, [e.id for e in entries] + [m.name for m in found])
