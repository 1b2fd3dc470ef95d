"""The in-process HTTP tests' app: the real FastAPI app over a fake backend, one per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_backend import FakeBackend
from fastapi.testclient import TestClient
from http_app import client_for


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(tmp_path: Path, backend: FakeBackend) -> TestClient:
    return client_for(tmp_path, backend)
