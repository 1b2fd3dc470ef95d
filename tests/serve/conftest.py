"""A real local Ray cluster for the serving tests (not local testing mode, where
``@serve.batch`` does not batch). Replicas inherit this process's environment, so they
load models from the test session's offline models directory."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import ray
from ray import serve

from encoders import pull
from mmembed.config import Settings


@pytest.fixture(scope="session")
def ray_cluster(settings: Settings) -> Iterator[None]:
    for name in ("demo-clip", "all-MiniLM-L6-v2"):
        pull(name, settings)
    os.environ["MMEMBED_DATA_DIR"] = str(settings.data_dir)
    os.environ["MMEMBED_ALLOW_DOWNLOADS"] = "false"
    # Logical CPUs, not cores: several single-CPU replicas share this machine's two cores.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _temp_dir="/tmp/mmembed-ray")
    yield
    serve.shutdown()
    ray.shutdown()
