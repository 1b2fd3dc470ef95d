"""One cluster of three nodes (``mmembed.cluster``, what ``mmembed cluster up`` starts) for the
cluster tests, and ``mmembed serve --address`` on it. Everything of the cluster runs in processes
of its own, so this test process never joins it (the session's single-node ``ray_cluster`` may
be running beside it)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from on_cluster import Served, cluster_env, free_port, wait_until
from s3 import S3Server

from mmembed.cluster import LocalCluster
from mmembed.config import Settings
from mmembed.encoders.provision import pull

REPO = Path(__file__).resolve().parents[2]
PORT = 26390  # the head's GCS port; the nodes use the 300 ports from it, the dashboard PORT + 1875


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.parent == Path(__file__).parent:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[LocalCluster]:
    """Every node holds the S3 credentials, as each machine of a real cluster would."""
    credentials = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), PORT, env=credentials)
    cluster.up()
    yield cluster
    cluster.down()


@pytest.fixture
def cluster(local_cluster: LocalCluster) -> LocalCluster:
    """The cluster with every worker up, whatever the test before it killed."""
    if local_cluster.heal():
        wait_until(lambda: len(local_cluster.nodes()) == 1 + local_cluster.workers, 60, "the workers to rejoin")
    return local_cluster


@pytest.fixture(scope="module")
def served(
    local_cluster: LocalCluster, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """``mmembed serve --address`` with the repository's serve-cluster.yaml on a port of its own."""
    for name in ("demo-clip", "all-MiniLM-L6-v2"):
        pull(name, settings.models_config())
    config = yaml.safe_load((REPO / "serve-cluster.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    log = path.with_name("serve.log").open("wb")
    command = [sys.executable, "-m", "mmembed.cli", "serve", "--address", local_cluster.address, "--config", str(path)]
    env = cluster_env(local_cluster, settings, MMEMBED_CACHE_URL="off")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, path.with_name("serve.log").read_text()[-3000:]
        try:  # ready, and every replica running (/readyz needs only one per model)
            if httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
                return False
            data = httpx.get(f"{url}/models", timeout=30).json()["data"]
        except httpx.HTTPError:
            return False
        return all(len(m["placement"]) == m["replicas"]["min"] for m in data) and all(
            r["state"] == "RUNNING" for m in data for r in m["placement"]
        )

    wait_until(ready, 300, "mmembed serve on the cluster")
    yield Served(url, process)
    process.terminate()
    process.wait(60)
