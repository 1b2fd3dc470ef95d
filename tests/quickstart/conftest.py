"""The main job, for real: `mmembed quickstart` as a user runs it, joined to the test
session's Ray cluster and serving on its HTTP port. The browser, notebook and main-job
tests all run against this one server and its demo catalogue."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from mmembed.config import Settings
from quickstart.quickstart_run import SCENES, Quickstart

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="package")
def quickstart(ray_cluster: int, settings: Settings) -> Iterator[Quickstart]:
    # A plain quick start: its server reads bulk sources only under its data directory, where
    # the page and notebook tests write theirs.
    env = os.environ | {"MMEMBED_DATA_DIR": str(settings.data_dir), "MMEMBED_COLLECTION": "quickstart"}
    env.pop("MMEMBED_INGEST_ROOTS", None)
    command = [sys.executable, "-m", "mmembed.cli", "quickstart", "--scenes", str(SCENES)]
    command += ["--address", ray.get_runtime_context().gcs_address, "--port", str(ray_cluster)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process, lines), daemon=True).start()
    output = []
    while (line := lines.get(timeout=900)) is not None:  # each line within 15 min, or the command hung
        output.append(line)
        if line.startswith("search page:"):
            break
    else:
        pytest.fail("mmembed quickstart stopped before serving:\n" + "".join(output))
    yield Quickstart(f"http://127.0.0.1:{ray_cluster}", settings.data_dir / "demo-catalogue", "".join(output))
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0, "mmembed quickstart did not stop cleanly on Ctrl-C"


def _pump(process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.put(line)
    lines.put(None)


@pytest.fixture(scope="package")
def artifacts() -> Path:
    """Screenshots and other outputs CI keeps: test-artifacts/ in the repository root."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
