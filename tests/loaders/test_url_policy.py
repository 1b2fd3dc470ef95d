"""The address policy on its own: which addresses and URLs it refuses, how allow-lists widen it.

Hosts go through the real resolver (``getaddrinfo``), which is what turns odd numeric spellings
and names like ``localhost`` into the addresses that are judged; nothing here connects anywhere,
and the public addresses are only ever checked, never reached (there is no network).
"""

from __future__ import annotations

import pickle

import pytest

from mmembed.loaders.url_policy import (
    STRICT_POLICY,
    FetchError,
    UrlPolicy,
    check_url,
    forbidden_reason,
    resolve_checked,
)


def vet_url(url: str, policy: UrlPolicy = STRICT_POLICY) -> list[str]:
    """Every check a fetch makes before it connects: the URL's form, then its host's addresses."""
    parsed = check_url(url)
    return resolve_checked(parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80), policy)


def code_of(url: str, policy: UrlPolicy = STRICT_POLICY) -> str:
    with pytest.raises(FetchError) as info:
        vet_url(url, policy)
    return info.value.code


# --- addresses ------------------------------------------------------------------------------------

ADDRESS_REASONS = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fec0::1", "private"),  # deprecated site-local, which ipaddress counts as global
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("fe80::1%1", "link-local"),
    ("169.254.169.254", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("100.100.100.200", "metadata"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("100.64.0.1", "CGNAT"),
    ("100.127.255.254", "CGNAT"),
    ("224.0.0.1", "multicast"),  # which ipaddress counts as global
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.1", "private"),  # documentation
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:10.0.0.1", "private"),
    ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 of 169.254.169.254, which ipaddress counts as global
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1, likewise
    ("::127.0.0.1", "reserved"),  # IPv4-compatible (deprecated)
]


@pytest.mark.parametrize(("address", "reason"), ADDRESS_REASONS)
def test_non_public_addresses_are_refused_with_their_reason(address: str, reason: str) -> None:
    found = forbidden_reason(address)
    assert found is not None and reason in found
    assert not STRICT_POLICY.allows_address(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:93.184.216.34"])
def test_public_addresses_pass(address: str) -> None:
    assert forbidden_reason(address) is None
    assert STRICT_POLICY.allows_address(address)


def test_every_resolved_address_must_pass_not_just_the_first() -> None:
    STRICT_POLICY.check_addresses("mixed.example", ["93.184.216.34", "2606:4700::1111"])
    for inward in (["93.184.216.34", "10.0.0.1"], ["10.0.0.1", "93.184.216.34"], ["2606:4700::1111", "::1"]):
        with pytest.raises(FetchError) as info:
            STRICT_POLICY.check_addresses("mixed.example", inward)
        assert info.value.code == "url_forbidden_address"


# --- URLs, through the real resolver ---------------------------------------------------------------

HOSTILE_URLS = [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.0.0.1:8080/x.png", "loopback"),
    ("https://127.0.0.1:8443/x.png", "loopback"),
    ("http://2130706433/", "loopback"),  # decimal
    ("http://0x7f000001/", "loopback"),  # hex
    ("http://0x7f.1/", "loopback"),  # hex, short
    ("http://017700000001/", "loopback"),  # octal
    ("http://127.1/", "loopback"),  # short
    ("http://localhost/", "loopback"),  # a name that resolves inward
    ("http://LOCALHOST./img.png", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://169.254.169.254/latest/meta-data/iam/", "metadata"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "metadata"),
    ("http://100.100.100.200/latest/meta-data/", "metadata"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://224.0.0.1/", "multicast"),
    ("http://10.0.0.1/", "private"),
    ("http://192.168.0.1/", "private"),
    ("http://[fc00::1]/", "private"),
    ("http://[fe80::1]/", "link-local"),
    ("http://169.254.0.1/", "link-local"),
    ("http://[64:ff9b::a9fe:a9fe]/", "metadata"),
]


@pytest.mark.parametrize(("url", "reason"), HOSTILE_URLS)
def test_hostile_urls_are_refused_naming_the_host_and_the_fix(url: str, reason: str) -> None:
    with pytest.raises(FetchError) as info:
        vet_url(url)
    message = str(info.value)
    assert info.value.code == "url_forbidden_address"
    assert reason in message
    assert check_url(url).host in message
    assert "MMEMBED_FETCH_ALLOW_HOSTS" in message and "MMEMBED_FETCH_ALLOW_PRIVATE" in message


def test_a_refused_name_does_not_disclose_what_it_resolved_to() -> None:
    with pytest.raises(FetchError) as info:
        vet_url("http://localhost/")
    assert "localhost resolves to a loopback address" in str(info.value)
    assert "127.0.0.1" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["http://93.184.216.34/a.png", "https://93.184.216.34:8443/a.png", "http://[2606:4700::1111]/a.png"]
)
def test_public_urls_pass_without_connecting(url: str) -> None:
    assert vet_url(url) == [check_url(url).host]


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://93.184.216.34/a.png", "url_scheme"),
        ("file:///etc/passwd", "url_scheme"),
        ("gopher://93.184.216.34:70/_", "url_scheme"),
        ("javascript:alert(1)", "url_scheme"),
        ("/just/a/path.png", "url_scheme"),
        ("http://user:secret@93.184.216.34/a.png", "url_credentials"),
        ("http://user@93.184.216.34/a.png", "url_credentials"),
        ("http://:secret@93.184.216.34/a.png", "url_credentials"),
        ("http:///a.png", "url_invalid"),
        ("http://[::1/", "url_invalid"),
        ("http://0177.0.0.1/", "url_invalid"),  # httpx refuses a dotted quad with an octal octet
        ("http://name.invalid/a.png", "url_dns"),
    ],
)
def test_urls_refused_by_their_form(url: str, code: str) -> None:
    assert code_of(url) == code
    assert code_of(url, UrlPolicy(allow_private=True)) == code  # not address checks: no allow-list lifts them


def test_credentials_are_not_echoed() -> None:
    with pytest.raises(FetchError) as info:
        vet_url("http://user:secret@93.184.216.34/a.png")
    assert "secret" not in str(info.value)


# --- allow-lists ----------------------------------------------------------------------------------


def test_allow_listed_ip_allows_that_address_whatever_the_spelling() -> None:
    policy = UrlPolicy(allow_hosts=("127.0.0.1",))
    for url in ("http://127.0.0.1:9000/a.png", "http://2130706433/", "http://localhost/", "http://[::ffff:127.0.0.1]/"):
        assert vet_url(url, policy)
    for url in ("http://127.0.0.2/", "http://[::1]/", "http://169.254.169.254/", "http://10.0.0.1/"):
        assert code_of(url, policy) == "url_forbidden_address"


def test_allow_listed_network_allows_addresses_inside_it() -> None:
    policy = UrlPolicy(allow_hosts=("10.0.0.0/8", "fd00:1234::/32"))
    assert vet_url("http://10.20.30.40/a.png", policy) == ["10.20.30.40"]
    assert vet_url("http://[::ffff:10.1.1.1]/", policy)
    assert vet_url("http://[fd00:1234::5]/", policy)
    for url in ("http://192.168.1.1/", "http://127.0.0.1/", "http://[fd00:ec2::254]/", "http://100.64.0.1/"):
        assert code_of(url, policy) == "url_forbidden_address"


def test_allow_listed_name_is_allowed_whatever_it_resolves_to_but_only_that_name() -> None:
    policy = UrlPolicy(allow_hosts=("LocalHost.",))
    assert vet_url("http://localhost:9000/a.png", policy)
    assert vet_url("http://LOCALHOST./", policy)
    assert code_of("http://127.0.0.1/", policy) == "url_forbidden_address"  # the address itself is not listed
    assert code_of("http://2130706433/", policy) == "url_forbidden_address"


def test_allow_private_turns_the_address_checks_off_and_nothing_else() -> None:
    policy = UrlPolicy(allow_private=True)
    for url, _ in HOSTILE_URLS:
        assert vet_url(url, policy)
    assert code_of("ftp://127.0.0.1/", policy) == "url_scheme"
    assert code_of("http://u:p@127.0.0.1/", policy) == "url_credentials"


def test_policy_from_a_setting_string_and_its_validation() -> None:
    policy = UrlPolicy(allow_hosts="127.0.0.1, 10.0.0.0/8  minio.internal,[::1]")  # type: ignore[arg-type]
    assert policy.allow_hosts == ("127.0.0.1", "10.0.0.0/8", "minio.internal", "[::1]")
    assert policy == UrlPolicy(allow_hosts=("127.0.0.1", "10.0.0.0/8", "minio.internal", "[::1]"))
    assert policy.allows_host("MINIO.internal.") and not policy.allows_host("other.internal")
    assert policy.allows_address("::1") and policy.allows_address("10.9.9.9")
    assert UrlPolicy(allow_hosts="") == STRICT_POLICY  # type: ignore[arg-type]
    for bad in ("http://minio:9000", "10.0.0.0/33", "minio.internal:9000", "bad host!", "a/b"):
        with pytest.raises(ValueError, match="MMEMBED_FETCH_ALLOW_HOSTS"):
            UrlPolicy(allow_hosts=(bad,))


def test_policy_survives_pickling_for_worker_processes() -> None:
    policy = UrlPolicy(allow_hosts=("10.0.0.0/8", "minio.internal"))
    copy = pickle.loads(pickle.dumps(policy))
    assert copy == policy and hash(copy) == hash(policy)
    assert copy.allows_address("10.1.1.1") and copy.allows_host("minio.internal")
    assert not copy.allows_address("192.168.1.1")


def test_resolve_checked_returns_the_addresses_to_pin() -> None:
    assert resolve_checked("127.1", 80, UrlPolicy(allow_hosts=("127.0.0.0/8",))) == ["127.0.0.1"]
    with pytest.raises(FetchError) as info:
        resolve_checked("127.1", 80, STRICT_POLICY)
    assert info.value.code == "url_forbidden_address"
