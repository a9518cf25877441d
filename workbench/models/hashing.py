"""sha256 of model files, remembered per (path, size, mtime) so a large file is read once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import _paths


def file_sha256(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    memo = _paths.home() / "sha256.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    known[key] = h.hexdigest()
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(known))
        os.replace(tmp, memo)
    except OSError:
        tmp.unlink(missing_ok=True)
    return known[key]
