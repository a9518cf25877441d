"""GGUF models already on this machine: the Hugging Face cache, Ollama's store, LM
Studio's folder and the project's models folder.

Each place is found the way its own tool finds it (environment variable first, then
the default), so a test or a lab machine can point it elsewhere. Every model found is
described from its GGUF header; a file that fails the header check is listed with
the reason instead.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import _paths
from ..errors import WorkbenchError

_SHA256_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")  # used with fullmatch
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


@dataclass(frozen=True)
class LocalModel:
    name: str                  # how `%load_model` can name it
    path: Path
    source: str                # huggingface | ollama | lmstudio | project
    size: int
    architecture: str = ""
    quantization: str = ""
    repo: str | None = None    # Hugging Face: the repository and snapshot it came from
    revision: str | None = None
    file: str | None = None    # the file's path inside the repository
    problem: str = ""          # why the header could not be read, if it could not


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(hf_home).expanduser() / "hub"


def ollama_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS", Path.home() / ".ollama" / "models")).expanduser()


def lmstudio_dirs() -> list[Path]:
    if os.environ.get("LMSTUDIO_MODELS"):
        return [Path(os.environ["LMSTUDIO_MODELS"]).expanduser()]
    return [Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"]


def project_dirs() -> list[Path]:
    """`./models` where the notebook runs, and the workbench's own models folder."""
    if os.environ.get("WORKBENCH_MODELS"):
        return [Path(p).expanduser() for p in os.environ["WORKBENCH_MODELS"].split(os.pathsep)]
    return [Path.cwd() / "models", _paths.home() / "models"]


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _describe(name: str, path: Path, source: str, **extra: str | None) -> LocalModel:
    from .gguf_file import read_header

    try:
        h = read_header(path)
        return LocalModel(name, path, source, h.file_size, h.architecture, h.quantization,
                          **extra)
    except (WorkbenchError, OSError) as e:  # a bad header, or a file we may not read
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        why = e.message if isinstance(e, WorkbenchError) else f"cannot read it: {e.strerror}"
        return LocalModel(name, path, source, size, problem=why, **extra)


def _huggingface(root: Path) -> list[LocalModel]:
    """Each snapshot's GGUF files. The one `refs/main` points to (else the newest) is
    named `repo/file`; older snapshots of the same file get `@revision` after it."""
    out = []
    for repo_dir in sorted(root.glob("models--*")):
        repo = repo_dir.name[len("models--"):].replace("--", "/", 1)
        snaps = [p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()]
        try:
            main = (repo_dir / "refs" / "main").read_text().strip()
        except OSError:
            main = ""
        # current first: the ref's snapshot, then the newest
        snaps.sort(key=lambda p: (p.name != main, -p.stat().st_mtime))
        named: set[str] = set()
        for snap in snaps:
            for f in sorted(snap.rglob("*.gguf")):
                # a snapshot links into the cache's blobs (the repository's, or the shared
                # store huggingface_hub keeps for Xet files): nothing outside the cache
                if not _inside(f, root):
                    continue
                rel = f.relative_to(snap).as_posix()
                name = f"{repo}/{rel}"
                if name in named:
                    name = f"{name}@{snap.name[:10]}"
                named.add(f"{repo}/{rel}")
                out.append(_describe(name, f, "huggingface", repo=repo, revision=snap.name,
                                     file=rel))
    return out


def ollama_blob(root: Path, manifest: Path) -> Path:
    """The GGUF blob an Ollama manifest names. Its digest must be a sha256: a digest
    with anything else in it could name a path outside the blob store."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        layers = data["layers"]
        digest = next(x["digest"] for x in layers if x.get("mediaType") == OLLAMA_MODEL_LAYER)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        raise WorkbenchError(f"{manifest} is not an Ollama model manifest",
                             "Pull the model again with `ollama pull`.") from None
    m = _SHA256_DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        raise WorkbenchError(f"{manifest} names a model blob {digest!r}, which is not a "
                             "sha256 digest: refused",
                             "A digest must be sha256: and 64 hex digits; one with anything "
                             "else could point outside Ollama's blob store.")
    blob = root / "blobs" / f"sha256-{m.group(1)}"
    if not _inside(blob, root / "blobs"):
        raise WorkbenchError(f"{manifest}'s model blob resolves outside {root / 'blobs'}: "
                             "refused", "Remove the link, then pull the model again.")
    return blob


def _ollama(root: Path) -> list[LocalModel]:
    out = []
    base = root / "manifests"
    for manifest in sorted(p for p in base.rglob("*") if p.is_file()):
        parts = manifest.relative_to(base).parts  # registry / namespace / model / tag
        if len(parts) < 3:
            continue
        ns, model, tag = parts[-3], parts[-2], parts[-1]
        name = f"ollama:{model}:{tag}" if ns == "library" else f"ollama:{ns}/{model}:{tag}"
        try:
            blob = ollama_blob(root, manifest)
        except WorkbenchError as e:
            out.append(LocalModel(name, manifest, "ollama", 0, problem=e.message))
            continue
        if blob.exists():
            out.append(_describe(name, blob, "ollama"))
    return out


def _folder(root: Path, source: str) -> list[LocalModel]:
    out = []
    for f in sorted(root.rglob("*.gguf")):
        if not _inside(f, root):
            out.append(LocalModel(f.relative_to(root).as_posix(), f, source, 0,
                                  problem=f"links outside {root}: not listed"))
            continue
        out.append(_describe(f.relative_to(root).as_posix(), f, source))
    return out


def discover() -> list[LocalModel]:
    """Every GGUF model found in the four places (those that exist)."""
    found: list[LocalModel] = []
    if hf_cache_dir().is_dir():
        found += _huggingface(hf_cache_dir())
    if ollama_dir().is_dir():
        found += _ollama(ollama_dir())
    for d in lmstudio_dirs():
        if d.is_dir():
            found += _folder(d, "lmstudio")
    for d in project_dirs():
        if d.is_dir():
            found += _folder(d, "project")
    return found


def find_local(name: str, found: list[LocalModel] | None = None) -> LocalModel | None:
    """The local model `name` names: its full listed name, or a unique file name or
    stem (`SmolLM2-135M-Instruct.Q4_1`). Names with `..` are refused."""
    if ".." in name.replace("\\", "/").split("/") or ".." in name:
        raise WorkbenchError(f"{name!r}: a model name may not contain '..'",
                             "Give the file's path instead, or a name `%models` lists.")
    found = discover() if found is None else found
    usable = [m for m in found if not m.problem]
    exact = [m for m in usable if m.name == name]
    if exact:
        return exact[0]
    short = [m for m in usable if m.path.name == name or m.path.name.removesuffix(".gguf") == name
             or m.name.rsplit("/", 1)[-1].removesuffix(".gguf") == name]
    if len({m.path.resolve() for m in short}) > 1:
        raise WorkbenchError(f"{name!r} names {len(short)} local models",
                             "Use one of the full names: " + ", ".join(m.name for m in short))
    if short:
        return short[0]
    bad = [m for m in found if m.problem and (m.name == name or m.path.name == name)]
    if bad:
        raise WorkbenchError(f"{name!r}: {bad[0].problem}", "See `%models --local`.")
    return None
