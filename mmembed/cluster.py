"""A Ray cluster of several nodes on one machine: a head and workers that declare the custom
resource ``{"encoder": 1}``, so encoder replicas and actors that ask for it run on the workers.

Each node is a real ``ray start`` with its own raylet, object store and ports, so scheduling,
object transfer between nodes and node failure behave as on separate machines; only the
network is loopback. ``mmembed cluster up|down|status`` and the cluster tests share this code.

Every process of the cluster carries ``MMEMBED_CLUSTER`` (its folder) and ``MMEMBED_CLUSTER_NODE``
(its node) in its environment, which the raylets hand on to every worker they start: that is how
``down`` stops this cluster and nothing else (``ray stop`` would stop every Ray on the machine,
the test suite's own included) and how ``kill`` takes one node down as a crash would.

The cluster has its own token (Ray 2.60 clusters started by ``ray start`` require one) and its
own temp folder, so a plain ``ray.init()`` on the machine never joins it by accident. Clients
(``mmembed serve --address``, ``mmembed ingest --engine ray --address``) need ``client_env``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ENCODER_RESOURCE = "encoder"
NODE_LABEL = "mmembed-node"  # each node's name (head, worker-1, ...), as Ray's node list shows it


@dataclass(frozen=True)
class LocalCluster:
    """``folder``: its sessions, logs and token. ``port``: the head's GCS port; worker ``n`` takes
    the 100 ports from ``port + 100 * n``. CPUs are logical: several nodes share this machine's cores."""

    folder: Path
    port: int = 6390
    workers: int = 2
    head_cpus: float = 2
    worker_cpus: float = 2
    object_store_bytes: int = 200_000_000
    head_resources: dict[str, float] = field(default_factory=dict)  # e.g. {"encoder": 2}: a cluster of one node
    # What every node's processes need in their environment, as an operator sets it on each machine:
    # credentials of the shared state (AWS_* for S3), which Ray would log if sent in a runtime env.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.port + 1875}"

    @property
    def token_path(self) -> Path:
        return self.folder / "auth_token"

    def client_env(self) -> dict[str, str]:
        """What a process joining this cluster needs in its environment (the token)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def metrics_port(self, node: str) -> int:
        """The Prometheus port of a node's metrics agent ("head", "worker-1", ...)."""
        return self.port + 4 if node == "head" else self.port + 100 * _worker_number(node) + 3

    def up(self) -> None:
        if self.processes():
            raise RuntimeError(f"a cluster already runs from {self.folder}: `mmembed cluster down` first")
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.token_path.exists():
            self.token_path.write_text(secrets.token_hex(32))
            self.token_path.chmod(0o600)
        head = [
            "--head", f"--port={self.port}", f"--temp-dir={self.folder}", f"--num-cpus={self.head_cpus}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.port + 1875}",
            f"--ray-client-server-port={self.port + 1}", f"--node-manager-port={self.port + 2}",
            f"--object-manager-port={self.port + 3}", f"--metrics-export-port={self.port + 4}",
            f"--dashboard-agent-listen-port={self.port + 5}", f"--dashboard-agent-grpc-port={self.port + 6}",
            f"--runtime-env-agent-port={self.port + 7}", f"--min-worker-port={self.port + 10}",
            f"--max-worker-port={self.port + 99}", f"--resources={json.dumps(self.head_resources)}",
        ]  # fmt: skip
        self._start("head", head)
        for n in range(1, self.workers + 1):
            self.start_worker(n)

    def heal(self) -> list[str]:
        """Starts again every worker that is down (after ``kill``); returns their names."""
        down = [n for n in range(1, self.workers + 1) if not self.processes(f"worker-{n}")]
        for n in down:
            self.start_worker(n)
        return [f"worker-{n}" for n in down]

    def start_worker(self, n: int) -> None:
        """Worker ``n`` joins the head (again, after ``kill``)."""
        base = self.port + 100 * n
        args = [
            f"--address={self.address}", f"--num-cpus={self.worker_cpus}",
            f"--resources={json.dumps({ENCODER_RESOURCE: 1})}", f"--node-manager-port={base + 1}",
            f"--object-manager-port={base + 2}", f"--metrics-export-port={base + 3}",
            f"--dashboard-agent-listen-port={base + 4}", f"--dashboard-agent-grpc-port={base + 5}",
            f"--runtime-env-agent-port={base + 6}", f"--min-worker-port={base + 10}",
            f"--max-worker-port={base + 99}",
        ]  # fmt: skip
        self._start(f"worker-{n}", args)

    def _start(self, node: str, args: list[str]) -> None:
        env = (
            os.environ
            | self.env
            | self.client_env()
            | {"MMEMBED_CLUSTER": str(self.folder), "MMEMBED_CLUSTER_NODE": node}
        )
        ray = [str(Path(sys.executable).parent / "ray"), "start"]
        common = [
            "--node-ip-address=127.0.0.1",
            f"--labels={json.dumps({NODE_LABEL: node})}",
            f"--object-store-memory={self.object_store_bytes}",
            "--disable-usage-stats",
        ]
        done = subprocess.run([*ray, *args, *common], env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            self.down()
            raise RuntimeError(f"ray start ({node}) failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def state(self, kind: str, **equal: str) -> list[dict]:
        """Rows of Ray's state API (``nodes``, ``actors``, ...) whose fields equal ``equal``, from the
        head's dashboard, as ``ray list`` would print them."""
        filters = {
            "filter_keys": list(equal),
            "filter_predicates": ["="] * len(equal),
            "filter_values": list(equal.values()),
        }
        answer = httpx.get(
            f"{self.dashboard_url}/api/v0/{kind}",
            params={"detail": "true", "limit": 10_000} | filters,
            headers={"Authorization": f"Bearer {self.token_path.read_text()}"},
            timeout=30,
        )
        answer.raise_for_status()
        return answer.json()["data"]["result"]["result"]

    def nodes(self) -> dict[str, str]:
        """The live nodes' Ray IDs by name."""
        rows = self.state("nodes", state="ALIVE")
        return {row["labels"][NODE_LABEL]: row["node_id"] for row in rows if NODE_LABEL in row.get("labels", {})}

    def processes(self, node: str | None = None) -> list[psutil.Process]:
        """This cluster's processes (one node's, given ``node``)."""
        found = []
        for process in psutil.process_iter():
            env = _environ(process)
            if env.get("MMEMBED_CLUSTER") == str(self.folder) and node in (None, env.get("MMEMBED_CLUSTER_NODE")):
                found.append(process)
        return found

    def kill(self, node: str) -> int:
        """SIGKILL every process of one node, as a machine that loses power: no goodbye to the
        head, which finds out by its health checks. Returns how many processes were killed."""
        return _kill(self.processes(node))

    def down(self) -> int:
        return _kill(self.processes())


def _environ(process: psutil.Process) -> dict[str, str]:
    """A process's environment as it started. Read by hand: the agents that rename themselves
    (``ray::DashboardAgent``) zero the head of theirs, where ``psutil`` stops reading."""
    try:
        raw = Path(f"/proc/{process.pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw.split(b"\0") if b"=" in entry)
    return {key: value for key, _, value in pairs}


def _kill(processes: list[psutil.Process]) -> int:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=10)
    return len(processes)


def _worker_number(node: str) -> int:
    prefix, _, number = node.partition("-")
    if prefix != "worker" or not number.isdigit():
        raise ValueError(f"not a worker node: {node!r} (worker-1, worker-2, ...)")
    return int(number)
