"""Which server, on this machine, holds a data directory's embedded store: ``mmembed serve``
and ``mmembed quickstart`` note their URL there while they run, so that ``mmembed ingest``,
which cannot open a store a server holds, sends its job to that server instead."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx

FILE = "server.json"


def note(data_dir: Path, url: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / FILE).write_text(json.dumps({"url": url, "pid": os.getpid()}))


def forget(data_dir: Path) -> None:
    path = data_dir / FILE
    if path.exists() and json.loads(path.read_text()).get("pid") == os.getpid():
        path.unlink()


def serving(data_dir: Path) -> str | None:
    """The URL of the server noted here, if it still runs and answers."""
    try:
        noted = json.loads((data_dir / FILE).read_text())
        os.kill(int(noted["pid"]), 0)  # raises if no such process
        answer = httpx.get(f"{noted['url']}/healthz", timeout=5)
    except (OSError, ValueError, KeyError, TypeError, httpx.HTTPError):
        return None
    return str(noted["url"]) if answer.status_code == 200 else None
