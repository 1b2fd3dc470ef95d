"""A Hugging Face-compatible endpoint for tests: serves model repos from local folders with the
routes ``huggingface_hub`` calls (repo info, the file tree, HEAD/GET of ``resolve`` URLs), so
``mmembed models pull`` runs the real download code with ``HF_ENDPOINT`` pointed here. Model
hubs are unreachable from this machine; the code paths that reach them must still run."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlparse


def _commit(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


class _Handler(BaseHTTPRequestHandler):
    repos: ClassVar[dict[str, Path]] = {}  # each server gets a subclass with its own
    requests: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _json(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _missing(self, what: str) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound" if what == "repo" else "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _route(self) -> None:
        path = unquote(urlparse(self.path).path)
        self.requests.append(f"{self.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._missing("repo")
            folder, commit = self.repos[repo], _commit(repo)
            if parts[4] == "revision":
                siblings = [{"rfilename": str(p.relative_to(folder))} for p in _files(folder)]
                return self._json({"id": repo, "modelId": repo, "sha": commit, "private": False, "siblings": siblings})
            tree = [
                {
                    "type": "file",
                    "path": str(p.relative_to(folder)),
                    "size": p.stat().st_size,
                    "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                }
                for p in _files(folder)
            ]
            return self._json(tree)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in self.repos:
                return self._missing("repo")
            file = self.repos[repo] / name
            if not file.is_file():
                return self._missing("entry")
            data = file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", _commit(repo))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data)
            return None
        return self._missing("repo")

    do_GET = do_HEAD = _route


@contextmanager
def hub(repos: dict[str, Path]) -> Iterator[tuple[str, list[str]]]:
    """Serves ``repos`` (repo id -> folder) on 127.0.0.1; yields the endpoint URL and the request log."""
    handler = type("Handler", (_Handler,), {"repos": dict(repos), "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
