"""The HTTP app in-process over ``FakeBackend``, for the tests of ``tests/serve/test_http_*.py``."""

from __future__ import annotations

import base64
from pathlib import Path

from fake_backend import PNG_MAGIC, WAV_MAGIC, FakeBackend
from fastapi.testclient import TestClient

from mmembed.config import Settings
from mmembed.serve.config import ServeConfig
from mmembed.serve.http import create_app
from mmembed.store.objects import LocalObjects

MODELS = ["demo-clip", "all-MiniLM-L6-v2", "whisper-base"]
PNG = PNG_MAGIC + b" a small picture"
WAV = WAV_MAGIC + b" a short clip"


def config(**overrides) -> ServeConfig:
    args = {"models": [{"name": m} for m in MODELS], "max_body_bytes": 100_000, "max_items_per_request": 4}
    return ServeConfig.model_validate(args | {"max_text_chars": 50} | overrides)


def client_for(
    tmp_path: Path,
    backend: FakeBackend | None = None,
    root_path: str = "",
    serve_config: ServeConfig | None = None,
    **settings,
) -> TestClient:
    defaults = {"data_dir": tmp_path, "api_keys_write": [], "api_keys_read": [], "cors_origins": []}
    objects = LocalObjects(tmp_path / "objects")
    app = create_app(
        backend or FakeBackend(), serve_config or config(), Settings(**(defaults | settings)), objects=objects
    )
    return TestClient(app, root_path=root_path)


def api_error(response, status: int, code: str, param: str | None = None) -> str:
    """Checks OpenAI's error shape: the code, the type OpenAI gives the status, the field at fault."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code, body
    types = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
    assert body["error"]["type"] == types.get(status, "server_error" if status >= 500 else "invalid_request_error")
    assert body["error"]["param"] == param, body
    return body["error"]["message"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
