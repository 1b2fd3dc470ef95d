"""Fetching URLs end to end against real local servers (http.server and a TLS socket in threads):
the address policy refuses before connecting, redirects are followed by hand with every hop
checked, and the byte, type, time and redirect limits hold, on the async path (``fetch``, the
API's) and the sync one (``fetch_sync`` and ``read_item``, the jobs')."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from http_handler import SiteHandler

from mmembed.loaders.fetch import FetchError, FetchLimits, fetch, fetch_sync
from mmembed.loaders.sources import SourceError, SourceItem, read_item
from mmembed.loaders.url_policy import STRICT_POLICY, AsyncPolicyClient, PolicyClient, UrlPolicy

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
LOCAL = UrlPolicy(allow_hosts=("127.0.0.1",))
QUICK = {"connect_timeout_s": 2.0, "read_timeout_s": 2.0}  # a broken policy fails fast, not after minutes


class Site(ThreadingHTTPServer):
    """A media site on 127.0.0.1 that records every request (path and Host header)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)  # listening from here on: no wait needed
        self.requests: list[tuple[str, str]] = []
        self.release = threading.Event()  # lets /endless.png finish

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


class Handler(SiteHandler):
    server: Site

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Host", "")))
        parts = urlsplit(self.path)
        if parts.path in ("/img.png", "/elsewhere/img.png"):
            self._send(200, IMAGE, "image/png")
        elif parts.path == "/octets":
            self._send(200, IMAGE, "application/octet-stream")
        elif parts.path == "/page.html":
            self._send(200, b"<html>not an image</html>", "text/html; charset=utf-8")
        elif parts.path == "/clip.wav":
            self._send(200, b"RIFF....WAVE", "audio/wav")
        elif parts.path == "/huge.png":  # declares more than any cap, sends nothing
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
        elif parts.path == "/endless.png":  # no Content-Length (HTTP/1.0: ends at close), then stalls
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(b"\0" * 300_000)
            self.wfile.flush()
            self.server.release.wait(30)
        elif parts.path == "/redirect":  # to ?to=..., as given
            self._redirect(parse_qs(parts.query)["to"][0])
        elif parts.path.startswith("/chain/"):  # /chain/N: N redirects, then the image
            n = int(parts.path.rsplit("/", 1)[1])
            self._redirect(f"/chain/{n - 1}") if n else self._send(200, IMAGE, "image/png")
        elif parts.path == "/a/b/relative":
            self._redirect("../../elsewhere/img.png")
        elif parts.path == "/no-location":
            self._send(302, b"", "text/plain")
        else:
            self._send(404, b"not here", "text/plain")


@pytest.fixture
def site() -> Iterator[Site]:
    server = Site()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket nobody accepts on: a client that connected would sit in its backlog."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s


def assert_never_connected(listener: socket.socket) -> None:
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()[0].close()


def get(url: str, kind: str = "image", policy: UrlPolicy = LOCAL, **limits: Any) -> bytes:
    return asyncio.run(fetch(url, kind, FetchLimits(policy=policy, **(QUICK | limits))))


def error(call: Callable[[], object]) -> FetchError:
    with pytest.raises(FetchError) as info:
        call()
    return info.value


def code(url: str, kind: str = "image", policy: UrlPolicy = LOCAL, **limits: Any) -> str:
    return error(lambda: get(url, kind, policy, **limits)).code


# --- the policy, end to end -------------------------------------------------------------------------


def test_strict_default_refuses_a_local_server_without_connecting(site: Site, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    for url in (f"http://127.0.0.1:{port}/a.png", f"http://localhost:{port}/a.png", f"http://2130706433:{port}/"):
        exc = error(lambda url=url: asyncio.run(fetch(url, "image")))  # the default limits: strict
        assert exc.code == "url_forbidden_address"
        assert "MMEMBED_FETCH_ALLOW_HOSTS" in str(exc)
    assert_never_connected(listener)
    assert code(f"{site.base}/img.png", policy=STRICT_POLICY) == "url_forbidden_address"
    assert site.requests == []


def test_allow_listed_address_is_fetched(site: Site) -> None:
    assert get(f"{site.base}/img.png") == IMAGE
    assert get(f"{site.base}/octets") == IMAGE  # the decoder sniffs: octet-stream passes
    assert get(f"{site.base}/clip.wav", "audio") == b"RIFF....WAVE"
    assert get(f"{site.base}/img.png", policy=UrlPolicy(allow_private=True)) == IMAGE
    assert site.paths == ["/img.png", "/octets", "/clip.wav", "/img.png"]


def test_connection_is_pinned_to_the_checked_address_and_keeps_the_host_name(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name answers 127.0.0.1 (allowed) once, then 127.0.0.2 (not, and nothing
    listens there). Only the first answer is ever used: the address checked is the one connected
    to, and the server still sees the name in Host."""
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1", "127.0.0.2", "127.0.0.2"])
    looked_up: list[str] = []

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.test":
            looked_up.append(host)
            host = next(answers)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://rebind.test:{site.port}/img.png"
    assert get(url) == IMAGE
    assert looked_up == ["rebind.test"]
    assert site.requests == [("/img.png", f"rebind.test:{site.port}")]
    answers = iter(["127.0.0.1", "127.0.0.2"])
    looked_up.clear()
    assert fetch_sync(url, FetchLimits(policy=LOCAL)) == IMAGE
    assert looked_up == ["rebind.test"]


def test_https_keeps_the_host_name_for_sni_and_verifies_the_certificate(tmp_path: Path) -> None:
    """Connected by address, TLS still names the host (SNI) and checks the certificate: a
    self-signed one for that very name is refused, so verification is on."""
    cert, key = self_signed(tmp_path, "localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,misc,return-value]
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)

        def handshake() -> None:
            conn, _ = server.accept()
            with conn, contextlib.suppress(OSError):
                context.wrap_socket(conn, server_side=True).recv(1)

        thread = threading.Thread(target=handshake, daemon=True)
        thread.start()
        port = server.getsockname()[1]
        exc = error(lambda: get(f"https://localhost:{port}/a.png", policy=UrlPolicy(allow_hosts=("localhost",))))
        thread.join(10)
    assert exc.code == "url_unreachable" and "CERTIFICATE_VERIFY_FAILED" in str(exc)
    assert names == ["localhost"]


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


# --- redirects ----------------------------------------------------------------------------------


def test_redirects_are_followed_up_to_the_limit(site: Site) -> None:
    assert get(f"{site.base}/chain/3") == IMAGE
    assert site.paths == ["/chain/3", "/chain/2", "/chain/1", "/chain/0"]
    site.requests.clear()
    exc = error(lambda: get(f"{site.base}/chain/4"))
    assert exc.code == "url_redirects" and "more than 3" in str(exc)
    assert site.paths == ["/chain/4", "/chain/3", "/chain/2", "/chain/1"]  # the 4th redirect is not followed
    assert code(f"{site.base}/chain/1", max_redirects=0) == "url_redirects"
    assert code(f"{site.base}/no-location") == "url_status"


def test_relative_and_absolute_locations(site: Site) -> None:
    assert get(f"{site.base}/a/b/relative") == IMAGE
    assert get(f"{site.base}/redirect?to=/img.png") == IMAGE
    assert get(f"{site.base}/redirect?to={site.base}/img.png") == IMAGE
    assert site.paths == [
        "/a/b/relative",
        "/elsewhere/img.png",  # ../../ from /a/b/
        "/redirect?to=/img.png",
        "/img.png",
        f"/redirect?to={site.base}/img.png",
        "/img.png",
    ]


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://10.0.0.1/admin",
        "http://127.0.0.2:{port}/img.png",
        "http://[::1]:{port}/img.png",
        "http://0x7f.2:{port}/img.png",
    ],
)
def test_redirect_to_a_forbidden_address_is_refused_at_the_hop(site: Site, target: str) -> None:
    url = f"{site.base}/redirect?to={target.format(port=site.port)}"
    exc = error(lambda: get(url))
    assert exc.code == "url_forbidden_address"
    assert str(exc).startswith("redirected to ")
    assert site.paths == [f"/redirect?to={target.format(port=site.port)}"]  # nothing more was asked


def test_a_name_on_the_allow_list_does_not_allow_its_address(site: Site) -> None:
    by_name = UrlPolicy(allow_hosts=("localhost",))
    assert get(f"http://localhost:{site.port}/img.png", policy=by_name) == IMAGE
    url = f"http://localhost:{site.port}/redirect?to={site.base}/img.png"
    assert code(url, policy=by_name) == "url_forbidden_address"
    assert site.requests == [
        ("/img.png", f"localhost:{site.port}"),
        (f"/redirect?to={site.base}/img.png", f"localhost:{site.port}"),
    ]


def test_redirect_hops_are_checked_for_scheme_and_credentials(site: Site) -> None:
    assert code(f"{site.base}/redirect?to=file:///etc/passwd") == "url_scheme"
    assert code(f"{site.base}/redirect?to=ftp://127.0.0.1/a.png") == "url_scheme"
    assert code(f"{site.base}/redirect?to=http://u:p@127.0.0.1:{site.port}/img.png") == "url_credentials"
    assert len(site.requests) == 3


def test_policy_client_checks_every_connection_even_when_httpx_follows_redirects(site: Site) -> None:
    with PolicyClient(LOCAL, follow_redirects=True) as client:
        assert client.get(f"{site.base}/chain/2").content == IMAGE
        with pytest.raises(FetchError) as info:
            client.get(f"{site.base}/redirect?to=http://[::1]:{site.port}/img.png")
    assert info.value.code == "url_forbidden_address"

    async def async_get() -> None:
        async with AsyncPolicyClient(STRICT_POLICY) as client:
            await client.get(f"{site.base}/img.png")

    assert error(lambda: asyncio.run(async_get())).code == "url_forbidden_address"
    assert site.paths == ["/chain/2", "/chain/1", "/chain/0", f"/redirect?to=http://[::1]:{site.port}/img.png"]


# --- the limits -------------------------------------------------------------------------------------


def test_size_cap_holds_while_streaming(site: Site) -> None:
    """/endless.png has no Content-Length, sends 300 kB and then stalls: only a cap applied as the
    bytes arrive ends the fetch at once (counted at the end, it would wait and time out)."""
    assert code(f"{site.base}/endless.png", max_bytes=100_000) == "url_too_large"
    exc = error(lambda: get(f"{site.base}/huge.png"))  # declared: refused before reading
    assert exc.code == "url_too_large" and str(10**12) in str(exc)
    assert code(f"{site.base}/img.png", max_bytes=len(IMAGE) - 1) == "url_too_large"
    assert get(f"{site.base}/img.png", max_bytes=len(IMAGE)) == IMAGE


def test_content_type_and_status(site: Site) -> None:
    exc = error(lambda: get(f"{site.base}/page.html"))
    assert exc.code == "url_wrong_type" and "text/html" in str(exc)
    assert code(f"{site.base}/img.png", "audio") == "url_wrong_type"
    assert code(f"{site.base}/missing.png") == "url_status"


def test_credentials_in_the_url_are_refused_before_anything_is_sent(site: Site) -> None:
    url = f"http://user:secret@127.0.0.1:{site.port}/img.png"
    exc = error(lambda: get(url))
    assert exc.code == "url_credentials" and "secret" not in str(exc)
    assert code(f"ftp://127.0.0.1:{site.port}/img.png") == "url_scheme"
    assert site.requests == []


def test_unreachable_unresolvable_and_silent_hosts(listener: socket.socket) -> None:
    with socket.socket() as closed:  # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        assert code(f"http://127.0.0.1:{closed.getsockname()[1]}/a.png") == "url_unreachable"
    assert code("http://name.invalid/a.png") == "url_dns"
    port = listener.getsockname()[1]  # accepted by the kernel, never answered
    assert code(f"http://127.0.0.1:{port}/a.png", read_timeout_s=0.3) == "url_timeout"


def test_total_deadline(site: Site) -> None:
    assert code(f"{site.base}/img.png", total_timeout_s=0.0) == "url_timeout"
    assert get(f"{site.base}/img.png", total_timeout_s=30.0) == IMAGE


# --- the sync path: fetch_sync and the jobs' read_item ----------------------------------------------


@dataclass
class SyncRead:
    site: Site
    policy: UrlPolicy | None = LOCAL
    seen: list[str] = field(default_factory=list)

    def code(self, path: str, **kwargs: Any) -> str:
        url = self.site.base + path if path.startswith("/") else path
        with pytest.raises(SourceError) as info:
            read_item(SourceItem(url, "image"), url_policy=self.policy, **kwargs)
        return info.value.code


def test_read_item_gets_the_same_refusals(site: Site, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    strict = SyncRead(site, policy=None)  # read_item's default
    assert strict.code(f"http://127.0.0.1:{port}/a.png") == "url_forbidden_address"
    assert strict.code(f"http://0x7f.1:{port}/a.png") == "url_forbidden_address"
    assert strict.code("/img.png") == "url_forbidden_address"
    assert_never_connected(listener)
    assert site.requests == []

    local = SyncRead(site)
    assert read_item(SourceItem(f"{site.base}/chain/3", "image"), url_policy=LOCAL) == IMAGE
    assert read_item(SourceItem(f"{site.base}/a/b/relative", "image"), url_policy=LOCAL) == IMAGE
    assert read_item(SourceItem(f"{site.base}/page.html", "image"), url_policy=LOCAL)  # no type check here
    site.requests.clear()
    assert local.code("/redirect?to=http://169.254.169.254/latest/meta-data/") == "url_forbidden_address"
    assert local.code(f"/redirect?to=http://[::1]:{site.port}/img.png") == "url_forbidden_address"
    assert local.code(f"http://u:p@127.0.0.1:{site.port}/img.png") == "url_credentials"
    assert local.code("/chain/4") == "url_redirects"
    assert local.code("/endless.png", max_bytes=100_000, timeout_s=2) == "too_large"
    assert local.code("/huge.png") == "too_large"
    assert local.code("/missing.png") == "url_status"
    assert local.code("http://name.invalid/a.png") == "url_dns"
    assert local.code(f"http://127.0.0.1:{port}/a.png", timeout_s=0.3) == "url_timeout"


def test_fetch_sync_reuses_only_a_client_of_its_own_policy(site: Site) -> None:
    with PolicyClient(LOCAL) as client:
        assert fetch_sync(f"{site.base}/img.png", FetchLimits(policy=LOCAL), "image", client) == IMAGE
        assert fetch_sync(f"{site.base}/clip.wav", FetchLimits(policy=LOCAL), None, client) == b"RIFF....WAVE"
        with pytest.raises(ValueError, match="policy"):
            fetch_sync(f"{site.base}/img.png", FetchLimits(), "image", client)
        with pytest.raises(ValueError, match="policy"):
            read_item(SourceItem(f"{site.base}/img.png", "image"), http_client=client, url_policy=STRICT_POLICY)
        assert read_item(SourceItem(f"{site.base}/img.png", "image"), http_client=client) == IMAGE
    with httpx.Client() as plain, pytest.raises(TypeError, match="PolicyClient"):
        fetch_sync(f"{site.base}/img.png", FetchLimits(policy=LOCAL), "image", plain)  # type: ignore[arg-type]
    assert site.paths == ["/img.png", "/clip.wav", "/img.png"]
