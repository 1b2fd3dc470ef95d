"""What the cluster tests share: waiting for the cluster to converge, and the environment of a
process that joins it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from mmembed.cluster import LocalCluster
from mmembed.config import Settings

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], T], timeout: float, what: str, every: float = 0.5) -> T:
    """Polls ``check`` until it returns something truthy: the cluster converges on its own time."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass(frozen=True)
class Served:
    url: str
    process: subprocess.Popen[bytes]


def cluster_env(cluster: LocalCluster, settings: Settings, **extra: str) -> dict[str, str]:
    return (
        os.environ
        | cluster.client_env()
        | {
            "MMEMBED_DATA_DIR": str(settings.data_dir),
            "MMEMBED_ALLOW_DOWNLOADS": "false",
            "RAY_ADDRESS": cluster.address,
        }
        | extra
    )
