"""API keys and CORS: which routes need which scope, constant-time comparison, and a real
Serve app with keys configured (reads keyed, one allowed web origin)."""

from __future__ import annotations

import hmac
import io
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, OpenAI
from PIL import Image
from ray import serve

from mmembed.serve.app import build_app
from mmembed.serve.http import auth
from mmembed.serve.http.auth import ApiKeys, required_scope

WRITE_KEY = "w-4f1c9a7e-write-key"
READ_KEY = "r-93b2d6c0-read-key"
ORIGIN = "https://shop.example"


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/healthz", "open"),
        ("GET", "/readyz", "open"),
        ("GET", "/", "open"),
        ("GET", "/ui/app.js", "open"),
        ("GET", "/objects/ab/abcd.png", "open"),
        ("GET", "/openapi.json", "open"),
        ("OPTIONS", "/v1/embeddings", "open"),
        ("POST", "/v1/embeddings", "read"),
        ("POST", "/encode/image/upload", "read"),
        ("POST", "/search", "read"),
        ("GET", "/items/123", "read"),
        ("GET", "/models", "read"),
        ("GET", "/metrics", "read"),
        ("GET", "/catalog", "read"),
        ("POST", "/items", "write"),
        ("DELETE", "/items/123", "write"),
        ("POST", "/ingest", "write"),
        ("GET", "/jobs", "write"),
        ("GET", "/jobs/abc/dead-letters", "write"),
        ("DELETE", "/jobs/abc", "write"),
        ("POST", "/migrations", "write"),
        ("POST", "/migrations/rollback", "write"),
    ],
)
def test_each_route_needs_its_scope(method: str, path: str, scope: str) -> None:
    assert required_scope(method, path) == scope


def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ApiKeys.from_strings(["r1", "r2"], ["w1", "w2", "w3"], open_reads=False)
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for token, scope in ((b"w1", "write"), (b"r2", "read"), (b"nope", None), (b"w", None)):
        calls.clear()
        assert keys.scope_of(token) == scope
        assert len(calls) == 5, "a match must not stop the comparison early"


def test_settings_merge_inline_keys_with_a_keys_file(tmp_path: Path) -> None:
    from mmembed.config import Settings

    file = tmp_path / "keys"
    file.write_text("write:w2\n# a comment\nread: r2\n")
    settings = Settings(api_keys_write="w1", api_keys_read="r1, r0", api_keys_file=file)
    assert settings.api_keys() == (["r1", "r0", "r2"], ["w1", "w2"])
    assert "w1" not in repr(settings)
    file.write_text("admin:x\n")
    with pytest.raises(ValueError, match="expected `read:KEY` or `write:KEY`"):
        settings.api_keys()


def test_no_keys_means_open_and_a_read_key_cannot_write() -> None:
    assert ApiKeys().denial("POST", "/items", b"") is None
    keys = ApiKeys.from_strings(["r"], ["w"], open_reads=True)
    assert keys.denial("POST", "/search", b"") is None
    assert keys.denial("POST", "/items", b"").status_code == 401
    assert keys.denial("POST", "/items", b"Bearer r").status_code == 403
    assert keys.denial("POST", "/items", b"Basic w").status_code == 401
    assert keys.denial("POST", "/items", b"bearer w") is None


@pytest.fixture(scope="module")
def api(ray_cluster: int, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Keys from a file, as a mounted secret: settings in a runtime env reach Ray's logs."""
    keys = tmp_path_factory.mktemp("secrets") / "api-keys"
    keys.write_text(f"# mmembed API keys\nwrite:{WRITE_KEY}\nwrite: another-write-key\n\nread:{READ_KEY}\n")
    env = {
        "MMEMBED_API_KEYS_FILE": str(keys),
        "MMEMBED_OPEN_READS": "false",
        "MMEMBED_CORS_ORIGINS": ORIGIN,
        "MMEMBED_COLLECTION": "auth",
    }
    serve.run(build_app({"models": [{"name": "demo-clip"}], "env": env}), name="auth", route_prefix="/auth")
    yield f"http://127.0.0.1:{ray_cluster}/auth"
    serve.delete("auth")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_probes_and_the_page_need_no_key(api: str) -> None:
    for path in ("/healthz", "/readyz", "/"):
        assert httpx.get(api + path, timeout=60).status_code == 200, path


def test_keyed_reads_refuse_a_missing_or_wrong_key(api: str) -> None:
    body = {"model": "demo-clip", "input": "a red circle"}
    missing = httpx.post(f"{api}/v1/embeddings", json=body, timeout=60)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["error"]["code"] == "unauthorized"
    assert httpx.post(f"{api}/v1/embeddings", json=body, headers=_bearer("guess"), timeout=60).status_code == 401
    assert httpx.post(f"{api}/v1/embeddings", json=body, headers=_bearer(READ_KEY), timeout=60).status_code == 200


def test_the_openai_client_sends_its_key(api: str) -> None:
    answer = OpenAI(base_url=f"{api}/v1", api_key=READ_KEY).embeddings.create(model="demo-clip", input=["a cat"])
    assert len(answer.data[0].embedding) == 128
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{api}/v1", api_key="wrong", max_retries=0).embeddings.create(model="demo-clip", input="x")


def test_writes_need_a_write_key(api: str) -> None:
    files = {"file": ("red.png", _png(), "image/png")}
    assert httpx.post(f"{api}/items", files=files, timeout=60).status_code == 401
    forbidden = httpx.post(f"{api}/items", files=files, headers=_bearer(READ_KEY), timeout=60)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    added = httpx.post(f"{api}/items", files=files, headers=_bearer(WRITE_KEY), timeout=120)
    assert added.status_code == 201, added.text
    item = added.json()["id"]
    assert httpx.get(f"{api}/items/{item}", headers=_bearer(READ_KEY), timeout=60).status_code == 200
    assert httpx.delete(f"{api}/items/{item}", headers=_bearer(READ_KEY), timeout=60).status_code == 403
    assert httpx.get(f"{api}/jobs", headers=_bearer(READ_KEY), timeout=60).status_code == 403
    assert httpx.post(f"{api}/ingest", json={"source": "/nowhere"}, timeout=60).status_code == 401
    assert httpx.delete(f"{api}/items/{item}", headers=_bearer("another-write-key"), timeout=60).status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:1/a.png",
        "http://[::1]/a.png",
        "http://10.0.0.7/a.png",
        "http://0x7f000001/a.png",
    ],
)
def test_the_default_address_policy_refuses_internal_urls(api: str, url: str) -> None:
    body = {"model": "demo-clip", "items": [url]}
    answer = httpx.post(f"{api}/encode/image", json=body, headers=_bearer(READ_KEY), timeout=60)
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "url_forbidden_address", answer.text
    assert "MMEMBED_FETCH_ALLOW_HOSTS" in answer.json()["error"]["message"]


def test_only_the_configured_origin_gets_cors_headers(api: str) -> None:
    def preflight(origin: str) -> httpx.Response:
        headers = {
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type",
        }
        return httpx.options(f"{api}/search", headers=headers, timeout=60)

    allowed = preflight(ORIGIN)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in preflight("https://evil.example").headers


def test_keys_never_reach_the_logs(api: str) -> None:
    httpx.post(f"{api}/search", json={"text": "red"}, headers=_bearer(WRITE_KEY), timeout=60)
    httpx.post(f"{api}/search", json={"text": "red"}, headers=_bearer("a-wrong-key-xyz"), timeout=60)
    logs = Path("/tmp/mmembed-ray/session_latest/logs")
    assert logs.is_dir()
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for secret in (WRITE_KEY, READ_KEY, "a-wrong-key-xyz"):
                assert secret.encode() not in text, f"{secret} appears in {path}"
