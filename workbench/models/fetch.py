"""Fetching catalog models from the Hugging Face Hub, verified before use.

Downloads go through huggingface_hub into its cache, so they resume where a dropped
connection left them and are shared with every other tool that uses the cache.
HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE are read when a download starts (not
when a module is imported), so a notebook can set them at any time.

Nothing unverified is returned: the file's sha256 must match the catalog's, or the
Hub's own (the etag of a file stored with LFS is its sha256). A file that fails is
removed from the cache. A write that fails (a full disk) removes the partial file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError
from .catalog import Variant
from .discover import LocalModel, hf_cache_dir

_SHA = "0123456789abcdef"
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass(frozen=True)
class Remote:
    """What the Hub says of a file now."""
    repo: str
    file: str
    commit: str | None
    sha256: str | None   # the LFS etag, when it is a sha256
    size: int | None


@dataclass(frozen=True)
class Update:
    model: LocalModel
    remote: Remote

    @property
    def changed(self) -> list[str]:
        out = []
        if self.remote.commit and self.remote.commit != self.model.revision:
            out.append(f"revision {str(self.model.revision)[:10]} → {self.remote.commit[:10]}")
        local_sha = _blob_sha(self.model.path)
        if self.remote.sha256 and local_sha and self.remote.sha256 != local_sha:
            out.append("file contents changed")
        if self.remote.size is not None and self.remote.size != self.model.size:
            out.append(f"size {self.model.size:,} → {self.remote.size:,} bytes")
        return out


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _blob_sha(path: Path) -> str | None:
    """A Hugging Face cache file is a link to blobs/<etag>: for LFS files, its sha256."""
    try:
        name = path.resolve().name
    except OSError:
        return None
    return name if len(name) == 64 and all(c in _SHA for c in name) else None


def _hub_error(e: Exception, repo: str, file: str) -> WorkbenchError:
    from huggingface_hub import errors as hf

    where = f"{repo}/{file}"
    if isinstance(e, hf.RevisionNotFoundError):
        return WorkbenchError(f"{where}: that revision does not exist on the Hub",
                              "Check the catalog's revision, or leave it out for the newest.")
    if isinstance(e, hf.LocalEntryNotFoundError):  # a kind of EntryNotFoundError: first
        return WorkbenchError(f"{where} is not in the local cache, and the Hub cannot be "
                              "reached" + (" (HF_HUB_OFFLINE is set)" if _offline() else ""),
                              "Connect to the network, or unset HF_HUB_OFFLINE, then run it "
                              "again; a download resumes where it stopped.")
    if isinstance(e, hf.EntryNotFoundError):
        return WorkbenchError(f"{where}: no such file on the Hub (404)",
                              "The repository exists but not this file: the catalog entry may "
                              "be out of date. `%models` lists the variants.")
    if isinstance(e, hf.RepositoryNotFoundError):
        return WorkbenchError(f"{repo}: no such repository on the Hub (404), or it is private",
                              "Check the name; for a gated model, log in with `hf auth login`.")
    if isinstance(e, hf.HfHubHTTPError):
        return WorkbenchError(f"{where}: the Hub answered {e}",
                              "Try again later; a download resumes where it stopped.")
    host = _endpoint() or "https://huggingface.co"
    return WorkbenchError(f"{where}: cannot reach the Hub at {host}: {e}",
                          "Check the connection (or HF_ENDPOINT) and run it again; a download "
                          "resumes where it stopped. HF_HUB_OFFLINE=1 uses only the cache.")


def remote_info(repo: str, file: str, revision: str | None = None) -> Remote:
    """The Hub's current commit, sha256 and size of one file (one HEAD request)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, file, revision=revision,
                                               endpoint=_endpoint()))
    except Exception as e:  # huggingface_hub's and httpx's errors both mean "not now"
        raise _hub_error(e, repo, file) from None
    etag = (meta.etag or "").strip('"').lower()
    return Remote(repo, file, meta.commit_hash,
                  etag if len(etag) == 64 and all(c in _SHA for c in etag) else None, meta.size)


def _sha256(path: Path, progress: Callable[[float], None] | None = None) -> str:
    h = hashlib.sha256()
    size = max(1, path.stat().st_size)
    done = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done / size)
    return h.hexdigest()


def _discard(path: Path) -> None:
    """Remove a cache file and the blob it links to."""
    try:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        if blob != path:
            blob.unlink(missing_ok=True)
    except OSError:
        pass


def _remove_partial(repo: str, etag: str | None) -> None:
    blobs = hf_cache_dir() / f"models--{repo.replace('/', '--')}" / "blobs"
    for p in blobs.glob(f"{etag}.incomplete" if etag else "*.incomplete"):
        p.unlink(missing_ok=True)


def download(v: Variant, revision: str | None = None,
             progress: Callable[[float], None] | None = None) -> Path:
    """The variant's file in the Hugging Face cache, downloaded if needed (resuming a
    partial download) and verified. `revision`: a commit (default: the catalog's)."""
    from huggingface_hub import hf_hub_download

    revision = revision or v.revision
    remote = None
    if not _offline():
        remote = remote_info(v.repo, v.file, revision)
        need = remote.size or v.size or 0
        root = hf_cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if need and free < need:
            raise WorkbenchError(
                f"{v.file} needs {need / 2**30:,.2f} GiB and {root} has "
                f"{free / 2**30:,.2f} GiB free",
                "Free some space, or point HF_HUB_CACHE at a larger disk.")
        revision = remote.commit or revision
    kwargs: dict[str, Any] = {"repo_id": v.repo, "filename": v.file, "revision": revision,
                              "cache_dir": str(hf_cache_dir()), "local_files_only": _offline()}
    if _endpoint():
        kwargs["endpoint"] = _endpoint()
    if progress is not None:
        kwargs["tqdm_class"] = _tqdm_for(progress)
    try:
        path = Path(hf_hub_download(**kwargs))
    except OSError as e:  # huggingface_hub's HTTP errors are OSErrors too
        if e.errno in _DISK_ERRORS:
            _remove_partial(v.repo, remote.sha256 if remote else None)
            raise WorkbenchError(f"the disk filled up while downloading {v.file}: "
                                 f"{e.strerror}; the partial file was removed",
                                 "Free some space, or point HF_HUB_CACHE at a larger disk, "
                                 "and run it again.") from None
        if "Consistency check failed" in str(e):
            _remove_partial(v.repo, remote.sha256 if remote else None)
            raise WorkbenchError(f"{v.file}: the download ended short of its size",
                                 "Run it again: it starts over.") from None
        raise _hub_error(e, v.repo, v.file) from None
    except Exception as e:
        raise _hub_error(e, v.repo, v.file) from None
    verify(path, v, remote)
    return path


def verify(path: Path, v: Variant, remote: Remote | None = None) -> None:
    """Check the file's sha256 against the catalog's (else the Hub's); remove it from
    the cache when it differs."""
    want = v.sha256 or (remote.sha256 if remote else None) or _blob_sha(path)
    if want is None:
        return  # neither the catalog nor the Hub gives a sha256 for this file
    got = _sha256(path)
    if got != want:
        _discard(path)
        raise WorkbenchError(
            f"{v.repo}/{v.file} failed verification: sha256 {got[:16]}… where "
            f"{'the catalog' if v.sha256 else 'the Hub'} says {want[:16]}…; the file was removed",
            "It may have been replaced on the Hub, or damaged in transit. Run it again; if it "
            "fails again, the catalog entry is out of date.")


def check_updates(models: list[LocalModel]) -> list[Update]:
    """For each file that came from the Hub, what the Hub's newest revision changes. A
    file with several snapshots counts as up to date when one of them is the newest."""
    groups: dict[tuple[str, str], list[LocalModel]] = {}
    for m in models:
        if m.source == "huggingface" and m.repo and m.file and not m.problem:
            groups.setdefault((m.repo, m.file), []).append(m)
    out = []
    for (repo, file), local in groups.items():
        remote = remote_info(repo, file)
        if any(m.revision == remote.commit for m in local):
            continue
        newest = max(local, key=lambda m: m.path.lstat().st_mtime)
        u = Update(newest, remote)
        if u.changed:
            out.append(u)
    return out


def apply_update(u: Update, progress: Callable[[float], None] | None = None) -> Path:
    """Download the newest revision beside the old one; the old file stays until the
    new one is verified (and stays in its snapshot afterwards)."""
    v = Variant(quant=u.model.quantization or "?", repo=u.model.repo or "",
                file=u.model.file or "", revision=u.remote.commit, size=u.remote.size,
                sha256=u.remote.sha256)
    return download(v, revision=u.remote.commit, progress=progress)


def _tqdm_for(progress: Callable[[float], None]) -> Any:
    """A tqdm class that reports the fraction done to `progress` and prints nothing."""
    from tqdm import tqdm  # the plain one: huggingface_hub passes it only what it accepts

    class _Bar(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            k["disable"] = False
            k["file"] = open(os.devnull, "w")  # noqa: SIM115 - closed with the bar
            super().__init__(*a, **k)

        def update(self, n: float | None = 1) -> bool | None:
            r = super().update(n)
            if self.total:
                progress(min(1.0, self.n / self.total))
            return r

        def close(self) -> None:
            f = self.fp
            super().close()
            try:
                f.close()
            except Exception:
                pass

    return _Bar
