"""Fetching catalog models from the Hugging Face Hub, verified before use.

Downloads go through huggingface_hub into its cache, shared with every other tool that
uses it. A dropped connection is resumed from the bytes already written (up to five
times within one download); huggingface_hub removes its partial file when a download
fails, so a later call starts over. HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE are
read when a call starts (not when a module is imported), so a notebook can set them
at any time.

Nothing unverified is returned: the file's sha256 must match the catalog's, or the
Hub's own (the etag of a file stored with LFS is its sha256). When the Hub's sha256
already differs from the catalog's, nothing is downloaded. A file that fails is
removed from the repository's part of the cache.
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
from ..progress import advance
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
    remote: Remote | None
    error: str = ""   # the Hub could not be asked about this one

    @property
    def changed(self) -> list[str]:
        if self.remote is None:
            return [f"not checked: {self.error}"]
        out = []
        if self.remote.commit and self.remote.commit != self.model.revision:
            out.append(f"revision {str(self.model.revision)[:10]} → {self.remote.commit[:10]}")
        local_sha = blob_sha(self.model.path)
        if self.remote.sha256 and local_sha and self.remote.sha256 != local_sha:
            out.append("file contents changed")
        if self.remote.size is not None and self.remote.size != self.model.size:
            out.append(f"size {self.model.size:,} → {self.remote.size:,} bytes")
        return out


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _offline() -> bool:
    """HF_HUB_OFFLINE as it is now, passed on to huggingface_hub, which reads it once."""
    import huggingface_hub.constants as hf_constants

    on = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    hf_constants.HF_HUB_OFFLINE = on
    return on


def _blob_link(path: Path) -> Path | None:
    """The repository's `blobs/<etag>` entry a snapshot file links to. (That entry may
    itself link on into huggingface_hub's shared store of Xet files.)"""
    try:
        if not path.is_symlink():
            return None
        return Path(os.path.normpath(path.parent / os.readlink(path)))
    except OSError:
        return None


def blob_sha(path: Path) -> str | None:
    """A cache file's sha256 from its `blobs/<etag>` name: the etag of an LFS file."""
    link = _blob_link(path)
    name = link.name if link is not None else ""
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
                              "again.")
    if isinstance(e, hf.EntryNotFoundError):
        return WorkbenchError(f"{where}: no such file on the Hub (404)",
                              "The repository exists but not this file: the catalog entry may "
                              "be out of date. `%models` lists the variants.")
    if isinstance(e, hf.RepositoryNotFoundError):
        return WorkbenchError(f"{repo}: no such repository on the Hub (404), or it is private",
                              "Check the name; for a gated model, log in with `hf auth login`.")
    if isinstance(e, hf.HfHubHTTPError):
        return WorkbenchError(f"{where}: the Hub answered {e}",
                              "Try again later.")
    host = _endpoint() or "https://huggingface.co"
    return WorkbenchError(f"{where}: cannot reach the Hub at {host}: {e}",
                          "Check the connection (or HF_ENDPOINT) and run it again. "
                          "HF_HUB_OFFLINE=1 uses only the cache.")


def remote_info(repo: str, file: str, revision: str | None = None) -> Remote:
    """The Hub's current commit, sha256 and size of one file (one HEAD request)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    if _offline():
        raise WorkbenchError(f"{repo}/{file}: HF_HUB_OFFLINE is set, so the Hub is not asked",
                             "Unset HF_HUB_OFFLINE to compare with the Hub.")
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
    """Remove a snapshot's file and the repository's blob entry it links to. A shared
    store entry behind that (other repositories may use it) is left alone."""
    link = _blob_link(path)
    try:
        path.unlink(missing_ok=True)
        if link is not None and link.parent.name == "blobs" \
                and link.parent.parent.name.startswith("models--"):
            link.unlink(missing_ok=True)
    except OSError:
        pass


def _repo_blob(repo: str, etag: str | None) -> Path | None:
    if not etag:
        return None
    return hf_cache_dir() / f"models--{repo.replace('/', '--')}" / "blobs" / etag


def download(v: Variant, revision: str | None = None,
             progress: Callable[[float], None] | None = None) -> Path:
    """The variant's file in the Hugging Face cache, downloaded if needed and verified.
    `revision`: a commit or branch (default: the catalog's, else the newest)."""
    from huggingface_hub import hf_hub_download

    revision = revision or v.revision
    remote = None
    if not _offline():
        remote = remote_info(v.repo, v.file, revision)
        if v.sha256 and remote.sha256 and remote.sha256 != v.sha256:
            raise WorkbenchError(
                f"{v.repo}/{v.file} on the Hub has sha256 {remote.sha256[:16]}… where the "
                f"catalog says {v.sha256[:16]}…: nothing was downloaded",
                "The file was replaced on the Hub since the catalog was written; the catalog "
                "entry needs updating (or pin the revision it was checked at).")
        blob = _repo_blob(v.repo, remote.sha256)
        need = 0 if blob is not None and blob.exists() else (remote.size or v.size or 0)
        root = hf_cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if need and free < need:
            raise WorkbenchError(
                f"{v.file} needs {need / 2**30:,.2f} GiB and {root} has "
                f"{free / 2**30:,.2f} GiB free",
                "Free some space, or point HF_HUB_CACHE at a larger disk.")
    kwargs: dict[str, Any] = {"repo_id": v.repo, "filename": v.file, "revision": revision,
                              "cache_dir": str(hf_cache_dir()), "local_files_only": _offline()}
    if _endpoint():
        kwargs["endpoint"] = _endpoint()
    if progress is not None:
        kwargs["tqdm_class"] = _tqdm_for(progress)
    try:
        path = Path(hf_hub_download(**kwargs))
    except OSError as e:  # huggingface_hub's HTTP errors are OSErrors too
        if e.errno in _DISK_ERRORS:  # huggingface_hub removes its partial file
            raise WorkbenchError(f"the disk filled up while downloading {v.file}: "
                                 f"{e.strerror}; the partial file was removed",
                                 "Free some space, or point HF_HUB_CACHE at a larger disk, "
                                 "and run it again.") from None
        if "Consistency check failed" in str(e):
            raise WorkbenchError(f"{v.file}: the download ended short of its size",
                                 "Run it again.") from None
        raise _hub_error(e, v.repo, v.file) from None
    except (ValueError, RuntimeError) as e:  # a name the Hub refuses, a Xet failure...
        raise WorkbenchError(f"{v.repo}/{v.file}: the download failed: {e}",
                             "Check the repository and file names in the catalog.") from None
    except Exception as e:
        raise _hub_error(e, v.repo, v.file) from None
    verify(path, v, remote)
    return path


def verify(path: Path, v: Variant, remote: Remote | None = None) -> None:
    """Check the file's sha256 against the catalog's (else the Hub's); remove it from
    the cache when it differs."""
    want = v.sha256 or (remote.sha256 if remote else None) or blob_sha(path)
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
    file with several snapshots counts as up to date when one of them is the newest. A
    repository the Hub cannot answer for gets a row saying why; the others go on."""
    groups: dict[tuple[str, str], list[LocalModel]] = {}
    for m in models:
        if m.source == "huggingface" and m.repo and m.file and not m.problem:
            groups.setdefault((m.repo, m.file), []).append(m)
    if groups and _offline():
        raise WorkbenchError("HF_HUB_OFFLINE is set, so the Hub is not asked about updates",
                             "Unset HF_HUB_OFFLINE to compare with the Hub.")
    out = []
    for (repo, file), local in groups.items():
        newest = max(local, key=lambda m: m.path.lstat().st_mtime)
        try:
            remote = remote_info(repo, file)
        except WorkbenchError as e:
            out.append(Update(newest, None, e.message))
            continue
        if any(m.revision == remote.commit for m in local):
            continue
        u = Update(newest, remote)
        if u.changed:
            out.append(u)
    return out


def apply_update(u: Update, progress: Callable[[float], None] | None = None) -> Path:
    """Download the newest revision beside the old one; the old file stays until the
    new one is verified (and stays in its snapshot afterwards)."""
    if u.remote is None:
        raise WorkbenchError(f"{u.model.name}: {u.error}", "Try again when the Hub answers.")
    v = Variant(quant=u.model.quantization or "?", repo=u.model.repo or "",
                file=u.model.file or "", revision=u.remote.commit, size=u.remote.size,
                sha256=u.remote.sha256)
    path = download(v, revision=u.remote.commit, progress=progress)
    _point_main_at(u.model.repo or "", u.remote.commit)
    return path


def _point_main_at(repo: str, commit: str | None) -> None:
    """refs/main names the snapshot now newest, as a download of "main" would leave it."""
    if not commit:
        return
    ref = hf_cache_dir() / f"models--{repo.replace('/', '--')}" / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".main.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def _tqdm_for(progress: Callable[[float], None]) -> Any:
    """A tqdm class that reports the fraction and the bytes done to `progress` and prints
    nothing."""
    from tqdm import tqdm  # the plain one: huggingface_hub passes it only what it accepts

    seen = [0.0]

    class _Bar(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            k["disable"] = False
            k["file"] = open(os.devnull, "w")  # noqa: SIM115 - closed with the bar
            super().__init__(*a, **k)

        def update(self, n: float | None = 1) -> bool | None:
            r = super().update(n)
            if self.total:  # never backwards (a Xet download's totals can grow)
                seen[0] = max(seen[0], min(1.0, self.n / self.total))
                advance(progress, seen[0], self.n, self.total, "B")
            return r

        def close(self) -> None:
            f = self.fp
            super().close()
            try:
                f.close()
            except Exception:
                pass

    return _Bar
