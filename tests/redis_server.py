"""A real Redis for tests: ``redis-server`` on a free loopback port, owned by the fixture.

Not daemonized, so the fixture holds the process and can stop it (a test that needs Redis to
go away mid-use) and start it again on the same port (the client's URL stays valid).
Nothing is saved: no RDB snapshots, no append-only file, data dir in a temp folder.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

READY_SECONDS = 15.0
STOP_SECONDS = 10.0


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail("redis-server is not on PATH: apt-get update && apt-get install -y redis-server")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """One redis-server that a test may stop and start again; ``url`` names the same server throughout."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def start(self, attempts: int = 3) -> None:
        """If the server exits while starting, another process took the port in the meantime: on the
        first start it tries a fresh port; a restart keeps the port, since clients already hold the URL."""
        for attempt in range(1, attempts + 1):
            if self._start_once():
                return
            if attempt == attempts or self.starts > 0:
                pytest.fail(f"redis-server did not start on port {self.port}:\n{self.log.read_text(errors='replace')}")
            self.port = _free_port()

    def _start_once(self) -> bool:
        command = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
        ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=1.0)
        deadline = time.monotonic() + READY_SECONDS
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        self.starts += 1
                        return True
                except redis.RedisError:
                    pass
                time.sleep(0.02)  # poll interval; the deadline bounds the wait
        finally:
            client.close()
        self.stop()
        pytest.fail(f"redis-server on port {self.port} did not answer PING within {READY_SECONDS:.0f} s")

    def stop(self, kill: bool = False) -> None:
        """SIGKILL (``kill=True``) is a crash: connections drop without a goodbye."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Redis for the whole run, as a URL; tests isolate themselves with their own key prefix."""
    server = RedisProcess(tmp_path_factory.mktemp("redis-server"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A Redis of the test's own, started, that the test may stop (even kill) and start again."""
    server = RedisProcess(tmp_path_factory.mktemp("redis-process"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
