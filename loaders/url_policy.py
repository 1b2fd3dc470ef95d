"""Which addresses a URL fetch may reach (the SSRF policy), and the HTTP clients that enforce it.

A server that fetches URLs its clients name can be made to reach what only the server can: its
own loopback services, the private network behind it, and above all the cloud metadata endpoint
(``169.254.169.254``), which hands out the machine's credentials. So, unless allow-listed, a fetch
may only reach *public* addresses; refused are loopback, private (RFC 1918, ULA ``fc00::/7``,
site-local), link-local, the metadata addresses (AWS/GCP/Azure/OpenStack ``169.254.169.254``, AWS
``fd00:ec2::254``, Alibaba ``100.100.100.200``), unspecified (``0.0.0.0``, ``::``), multicast,
reserved and shared (CGNAT ``100.64.0.0/10``) addresses, and IPv6 forms that carry any of those as
an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4, Teredo).

The check is on *addresses*, not on how the URL spells its host: every host, names and literals
alike, goes through ``socket.getaddrinfo``, and every address it returns must pass. So names that
resolve inward (``localhost``, a DNS record pointing at ``10.0.0.5``) and the odd numeric spellings
the C resolver accepts (``2130706433``, ``0x7f.1``, ``127.1``, ``017700000001``) are caught like
``127.0.0.1`` itself, with no parser of our own to get wrong.

The check happens where the connection is made, not before: ``PolicyClient`` and
``AsyncPolicyClient`` are httpx clients whose transport hands httpcore a network backend that
resolves the host, checks every address, and then connects to one of those very addresses (it is
*pinned*). A DNS answer that changes between check and connect (DNS rebinding) therefore cannot
swap in another address: there is no second lookup. httpcore still gets the hostname for
everything else, so the ``Host`` header, TLS SNI and certificate verification are those of the
name in the URL. Every connection the client opens is checked, whatever code drives it, including
each redirect hop (``loaders.fetch`` follows redirects itself, one checked request at a time, so
each hop's scheme and credentials are checked too). Environment proxies are not used
(``trust_env=False``): a proxy would resolve names itself and defeat the check.

httpx has no public hook for a network backend, so ``PolicyTransport`` swaps the connection pool
httpx built for one with the checking backend; should a future httpx keep its pool elsewhere,
constructing a client fails loudly rather than fetching unchecked (and the tests fail too).

Allow-listing (``UrlPolicy``) is for deployments that fetch from their own network on purpose,
e.g. a MinIO server: ``allow_hosts`` names hosts (allowed whatever they resolve to), IP addresses
and CIDR networks (allowed addresses); ``allow_private=True`` turns the address check off.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import ssl
import typing
from dataclasses import dataclass, field
from functools import cache

import anyio
import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW_PRIVATE_SETTING = "MMEMBED_FETCH_ALLOW_PRIVATE"
ALLOW_HOSTS_SETTING = "MMEMBED_FETCH_ALLOW_HOSTS"
SCHEMES = ("http", "https")


class FetchError(ValueError):
    """A URL that was not fetched. ``code`` is stable (API error codes, job records): url_invalid,
    url_scheme, url_credentials, url_dns, url_forbidden_address, url_redirects, url_timeout,
    url_too_large, url_wrong_type, url_status, url_unreachable."""

    code = "url_error"

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# Addresses

_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
    )
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # Linux connects 0.x.y.z to the local host
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # CGNAT; also where Alibaba's metadata lives
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: an IPv4 address in the low bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215)


def forbidden_reason(address: str | IPAddress) -> str | None:
    """Why ``address`` may not be fetched from without an allow-list entry ("a loopback address",
    ...), or None for a public address. IPv6 forms that embed an IPv4 address are judged by it too,
    since the network delivers them there."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:  # fe80::1%eth0: the zone does not change what the address is
            ip = ipaddress.IPv6Address(int(ip))
        if ip.ipv4_mapped is not None:  # the IPv4 address itself, on a dual-stack socket
            reason = forbidden_reason(ip.ipv4_mapped)
            return f"{reason} (IPv4-mapped)" if reason else None
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = forbidden_reason(embedded)
            if reason:
                return f"{reason} (inside IPv6 {ip})"
    if ip in _METADATA:
        return "a cloud metadata address"
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip in _SHARED:
        return "a shared (CGNAT) address"
    if ip.is_reserved:  # before private: ipaddress counts 240.0.0.0/4 as both
        return "a reserved address"
    if ip.is_private or ip in _NAT64_LOCAL or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local):
        return "a private address"
    if not ip.is_global:  # documentation, benchmarking and other special-purpose ranges
        return "a non-public address"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a translating network (NAT64, 6to4, Teredo) would deliver ``ip`` to."""
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def _unmapped(ip: IPAddress) -> IPAddress:
    """``::ffff:10.0.0.5`` is ``10.0.0.5`` for allow-list matching: an IPv4 network allows both."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id:
            return ipaddress.IPv6Address(int(ip))
    return ip


# ---------------------------------------------------------------------------------------------
# The policy

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


def _normal_host(host: str) -> str:
    """Hosts compare as httpx hands them over: lower case, no brackets, no trailing dot."""
    return host.strip().strip("[]").rstrip(".").lower()


@dataclass(frozen=True)
class UrlPolicy:
    """Where fetches may go. The default is strict: public addresses only.

    ``allow_hosts`` entries are hostnames (exact, case-insensitive: that host is allowed whatever
    it resolves to), IP addresses, or CIDR networks (``10.0.0.0/8``, ``fd00::/8``: addresses in
    them are allowed, whichever name led there). A comma- or space-separated string is accepted
    too, as an environment variable gives it. ``allow_private=True`` turns the address check off
    entirely: for trusted deployments and tests only. Scheme and credential checks stay on.
    Entries that are none of the three (``http://minio:9000``, ``10.0.0.0/33``) are a ValueError
    here, at configuration time, rather than a silent non-match later.
    """

    allow_private: bool = False
    allow_hosts: tuple[str, ...] = ()
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False)
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        entries = self.allow_hosts
        if isinstance(entries, str):
            entries = tuple(e for e in re.split(r"[,\s]+", entries) if e)
        entries = tuple(entries)
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            text = _normal_host(str(entry))
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            with contextlib.suppress(UnicodeError):
                text = text.encode("idna").decode("ascii")  # as httpx sends an internationalised name
            if not _HOSTNAME.match(text):
                raise ValueError(
                    f"{ALLOW_HOSTS_SETTING} entry {entry!r} is not a hostname, an IP address or a CIDR network"
                )
            hosts.add(text)
        object.__setattr__(self, "allow_hosts", entries)
        object.__setattr__(self, "_hosts", frozenset(hosts))
        object.__setattr__(self, "_networks", tuple(networks))

    def allows_host(self, host: str) -> bool:
        """Whether ``host`` (a name) is allow-listed by name, so its addresses are not checked."""
        return _normal_host(host) in self._hosts

    def allows_address(self, address: str | IPAddress) -> bool:
        """Whether ``address`` may be connected to: public, or inside an allow-listed network."""
        if self.allow_private:
            return True
        ip = _unmapped(ipaddress.ip_address(address) if isinstance(address, str) else address)
        return forbidden_reason(ip) is None or any(ip in net for net in self._networks)

    def check_addresses(self, host: str, addresses: typing.Sequence[str]) -> None:
        """Raise ``url_forbidden_address`` unless every address ``host`` resolved to may be reached.
        Every one, not just the first: the connection may go to any of them, and a name that
        resolves both outward and inward is not one to trust."""
        if self.allow_private or self.allows_host(host):
            return
        for address in addresses:
            if not self.allows_address(address):
                raise FetchError(self._refusal(host, address), "url_forbidden_address")

    @staticmethod
    def _refusal(host: str, address: str) -> str:
        # The resolved address itself is left out: a remote client need not learn internal DNS.
        reason = forbidden_reason(address) or "not allowed"
        what = f"{host} is {reason}" if _is_ip_literal(host) else f"{host} resolves to {reason}"
        return (
            f"{what}; only public addresses are fetched. To allow it, add {host} (or its network) to "
            f"{ALLOW_HOSTS_SETTING} (hostnames, IPs or CIDR networks, comma-separated), or set "
            f"{ALLOW_PRIVATE_SETTING}=true"
        )


STRICT_POLICY = UrlPolicy()  # public addresses only: every default in this package


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(_normal_host(host))
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# URLs and resolution


def check_url(url: str | httpx.URL) -> httpx.URL:
    """``url`` parsed, if it is one a fetch may request: http(s), a host, no credentials. Any
    ``user:pass@`` is refused rather than dropped: httpx would send it as Basic auth to whatever
    the host turns out to be, and a URL that carries secrets has no business in a fetch request.
    Addresses are checked at connect time (``PolicyClient``) or by ``resolve_checked``."""
    shown = str(url)[:80]
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise FetchError(f"{shown!r} is not a valid URL ({exc})", "url_invalid") from exc
    if parsed.scheme not in SCHEMES:
        raise FetchError(f"only http(s) URLs are fetched, not {shown!r}", "url_scheme")
    if parsed.userinfo:
        raise FetchError(f"URLs with credentials (user:password@) are not fetched: {parsed.host}", "url_credentials")
    if not parsed.host:
        raise FetchError(f"{shown!r} has no host", "url_invalid")
    return parsed


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to for a TCP connection, in the resolver's order. Numeric
    hosts in any spelling the C library accepts come back as their canonical address."""
    try:
        infos = socket.getaddrinfo(_normal_host(host), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(f"{host} does not resolve", "url_dns") from exc
    addresses = list(dict.fromkeys(str(i[4][0]) for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)))
    if not addresses:
        raise FetchError(f"{host} does not resolve to an IP address", "url_dns")
    return addresses


def resolve_checked(host: str, port: int, policy: UrlPolicy) -> list[str]:
    """``host``'s addresses, every one checked against ``policy``: the ones to connect to."""
    addresses = resolve(host, port)
    policy.check_addresses(host, addresses)
    return addresses


async def resolve_checked_async(host: str, port: int, policy: UrlPolicy, timeout: float | None) -> list[str]:
    """``resolve_checked`` in a worker thread (getaddrinfo blocks), waiting at most ``timeout``;
    a lookup that outlives it is left to finish on its own."""
    try:
        with anyio.fail_after(timeout):
            addresses = await anyio.to_thread.run_sync(resolve, host, port, abandon_on_cancel=True)
    except TimeoutError as exc:
        raise FetchError(f"resolving {host} timed out", "url_timeout") from exc
    policy.check_addresses(host, addresses)
    return addresses


# ---------------------------------------------------------------------------------------------
# Enforcement at connect time


class _CheckingBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, connecting only to addresses the policy allows: resolve, check,
    then connect to the checked address itself (the inner backend gets an IP literal, so it does
    no lookup of its own). TLS is started later by httpcore with the original hostname. The lookup
    here is bounded only by the system resolver's own timeouts (the async backend's by the connect
    timeout too)."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy, self._inner = policy, httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        options = list(socket_options or ())
        failure: httpcore.ConnectError | None = None
        for address in resolve_checked(host, port, self.policy):
            try:
                return self._inner.connect_tcp(address, port, timeout, local_address, options)
            except httpcore.ConnectError as exc:  # try the next address, as create_connection would
                failure = exc
        assert failure is not None
        raise failure

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise FetchError("unix sockets are not fetched from", "url_forbidden_address")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _AsyncCheckingBackend(httpcore.AsyncNetworkBackend):
    """The async ``_CheckingBackend`` (anyio: asyncio and trio alike)."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy, self._inner = policy, httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        options = list(socket_options or ())
        failure: httpcore.ConnectError | None = None
        for address in await resolve_checked_async(host, port, self.policy, timeout):
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, options)
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise FetchError("unix sockets are not fetched from", "url_forbidden_address")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@cache
def _ssl_context() -> ssl.SSLContext:
    """One verifying context for all clients: building one reads the CA bundle (milliseconds)."""
    return httpx.create_ssl_context()


def _replace_pool(transport: httpx.HTTPTransport | httpx.AsyncHTTPTransport, pool: object) -> None:
    # httpx offers no way to give its transport a network backend, so the pool it built is swapped
    # for one with ours. Should a future httpx keep its pool elsewhere, fail here, loudly, rather
    # than fetch unchecked.
    expected = httpcore.ConnectionPool if isinstance(transport, httpx.HTTPTransport) else httpcore.AsyncConnectionPool
    if type(getattr(transport, "_pool", None)) is not expected:
        raise RuntimeError(f"httpx {httpx.__version__} keeps its connection pool elsewhere: update loaders.url_policy")
    transport._pool = pool  # type: ignore[union-attr]


def _pool_options() -> dict[str, typing.Any]:
    """What httpx would give its own pool: its default limits and our TLS context."""
    limits = httpx.Limits()
    return {
        "ssl_context": _ssl_context(),
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
    }


class PolicyTransport(httpx.HTTPTransport):
    """An httpx transport whose every connection goes through ``policy`` (and is pinned)."""

    def __init__(self, policy: UrlPolicy = STRICT_POLICY) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False)
        _replace_pool(self, httpcore.ConnectionPool(**_pool_options(), network_backend=_CheckingBackend(policy)))
        self.policy = policy


class AsyncPolicyTransport(httpx.AsyncHTTPTransport):
    """The async ``PolicyTransport``."""

    def __init__(self, policy: UrlPolicy = STRICT_POLICY) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False)
        _replace_pool(
            self, httpcore.AsyncConnectionPool(**_pool_options(), network_backend=_AsyncCheckingBackend(policy))
        )
        self.policy = policy


class PolicyClient(httpx.Client):
    """An ``httpx.Client`` that connects only where ``policy`` allows, pinned to the checked address.
    It does not follow redirects by default (``loaders.fetch`` does, checking each hop's URL); if a
    caller asks it to, each hop's connection is still checked. No environment proxies."""

    def __init__(self, policy: UrlPolicy = STRICT_POLICY, **kwargs: typing.Any) -> None:
        kwargs.setdefault("follow_redirects", False)
        super().__init__(transport=PolicyTransport(policy), trust_env=False, **kwargs)
        self.policy = policy


class AsyncPolicyClient(httpx.AsyncClient):
    """The async ``PolicyClient``."""

    def __init__(self, policy: UrlPolicy = STRICT_POLICY, **kwargs: typing.Any) -> None:
        kwargs.setdefault("follow_redirects", False)
        super().__init__(transport=AsyncPolicyTransport(policy), trust_env=False, **kwargs)
        self.policy = policy
