"""A real local Ray cluster for the serving tests (not local testing mode, where
``@serve.batch`` does not batch). Replicas inherit this process's environment, so they
load models from the test session's offline models directory."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import ray
from ray import serve

from encoders import pull
from mmembed.config import Settings


@pytest.fixture(scope="session")
def ray_cluster(settings: Settings) -> Iterator[int]:
    """Ray plus Serve's HTTP proxy on a free port (started here, before any app: Serve
    ignores HTTP options once it runs). Yields the port."""
    for name in ("demo-clip", "all-MiniLM-L6-v2"):
        pull(name, settings)
    os.environ["MMEMBED_DATA_DIR"] = str(settings.data_dir)
    os.environ["MMEMBED_ALLOW_DOWNLOADS"] = "false"
    # Batching tests count forward passes; the one cache test turns it on for its own app.
    os.environ["MMEMBED_CACHE_URL"] = "off"
    # Logical CPUs, not cores: several single-CPU replicas share this machine's two cores.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _temp_dir="/tmp/mmembed-ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()
