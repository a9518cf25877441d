"""A stand-in for the Hugging Face Hub's file endpoint, on loopback.

It answers `HEAD` and `GET /{repo}/resolve/{revision}/{path}` the way the Hub does for
a file stored with LFS: X-Repo-Commit, X-Linked-Etag (the sha256), X-Linked-Size,
byte ranges (206) for resumed downloads, and 404 with X-Error-Code for a missing
repository or file. Tests can make it drop the connection part-way through a body,
or publish a new revision.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Hub:
    # repo -> branch -> commit; commit -> {path: bytes}
    branches: dict[str, dict[str, str]] = field(default_factory=dict)
    trees: dict[str, dict[str, bytes]] = field(default_factory=dict)
    drop_after: int | None = None   # the next full GET sends this many bytes, then hangs up
    gets: list[str] = field(default_factory=list)   # Range header of each GET ("-" if none)
    # path -> bytes sent in place of the file, its etag and size unchanged (damage in transit)
    damaged: dict[str, bytes] = field(default_factory=dict)

    def publish(self, repo: str, files: dict[str, bytes], branch: str = "main") -> str:
        """A new commit of `repo` holding `files`; `branch` points to it. Returns its id."""
        n = sum(len(b) for b in self.branches.values()) + len(self.trees)
        commit = hashlib.sha1(f"{repo}{n}{sorted(files)}".encode()).hexdigest()
        self.trees[commit] = dict(files)
        self.branches.setdefault(repo, {})[branch] = commit
        return commit


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    route = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _missing(self, code: str, text: str) -> None:
            body = text.encode()
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", text)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def _serve(self) -> None:
            m = route.match(self.path.split("?")[0])
            if not m:
                return self._missing("RepoNotFound", "Repository not found")
            repo, rev, path = m["repo"], m["rev"], m["path"]
            if repo not in hub.branches:
                return self._missing("RepoNotFound", "Repository not found")
            commit = hub.branches[repo].get(rev, rev)
            if commit not in hub.trees:
                return self._missing("RevisionNotFound", "Invalid rev id")
            data = hub.trees[commit].get(path)
            if data is None:
                return self._missing("EntryNotFound", "Entry not found")
            sha = hashlib.sha256(data).hexdigest()
            start = 0
            rng = self.headers.get("Range", "")
            if self.command == "GET":
                hub.gets.append(rng or "-")
            if rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", f'"{sha}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            body = hub.damaged.get(path, data)[start:]
            if hub.drop_after is not None and not start:
                cut, hub.drop_after = hub.drop_after, None
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        do_GET = do_HEAD = _serve

    return Handler


class HubServer:
    """`with HubServer() as hub_url:`; the `Hub` is `.hub`."""

    def __init__(self) -> None:
        self.hub = Hub()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.hub))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
