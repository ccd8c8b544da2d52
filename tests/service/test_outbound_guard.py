"""The SSRF guard's decisions, made without connecting anywhere: addresses come from a resolver
the test controls, and a literal address is judged as the resolver would answer it. Every IPv6
form that carries an IPv4 address is judged by that IPv4 address."""

import pytest

from service.outbound import guard

PUBLIC_V4 = "93.184.216.34"


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """A literal address resolves to itself; a name resolves nowhere (no lookup leaves here)."""

    def literal_only(host: str, port: int) -> list[str]:
        return [host.strip("[]")] if ":" in host or host.replace(".", "").isdigit() else []

    monkeypatch.setattr(guard, "resolve", literal_only)


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata service 169.254.169.254
        "64:ff9b:1::a00:1",  # local-use NAT64: never public
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a00:1::",  # 6to4 of 10.0.0.1
        "::127.0.0.1",  # IPv4-compatible
        "::ffff:0:7f00:1",  # SIIT (IPv4-translated)
        "::ffff:127.0.0.1",  # IPv4-mapped
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    ],
)
def test_an_ipv6_form_of_an_internal_ipv4_address_is_refused(address: str) -> None:
    with pytest.raises(guard.TargetRefused, match="non-public"):
        guard.check(f"http://[{address}]:8080/hook", [])


@pytest.mark.parametrize("address", ["64:ff9b::5db8:d822", "2002:5db8:d822::1", "2606:4700::1"])
def test_an_ipv6_form_of_a_public_address_passes(address: str) -> None:
    target = guard.check(f"https://[{address}]/hook", [])

    assert target.address == address and target.url.host == address


def test_an_allowed_network_admits_its_embedded_forms_only_by_the_operators_leave() -> None:
    assert guard.check("http://[64:ff9b::7f00:1]/", ["64:ff9b::/96"]).address == "64:ff9b::7f00:1"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000\\@[64:ff9b::5db8:d822]/x",  # read two ways by two parsers
        "http://example.com:65536/",
        "http://example.com:-1/",
        "http://example.com:99999999999999999999/",
        "http://[::1/",
        "http://[64:ff9b::zz]/",
        "http://exa mple.com/",
        "http://example.com/\x00",
        "ftp://example.com/",
        "http:///path-only",
    ],
)
def test_a_malformed_url_is_refused_in_one_line(url: str) -> None:
    with pytest.raises(guard.TargetRefused) as refused:
        guard.check(url, ["127.0.0.0/8"])

    assert "\n" not in str(refused.value)


def test_the_target_carries_the_one_parse_the_client_uses() -> None:
    target = guard.check(f"https://user@{PUBLIC_V4}:8443/a/b?c=d", [])

    assert (target.url.host, target.url.port, target.url.path) == (PUBLIC_V4, 8443, "/a/b")
    assert target.addresses == [PUBLIC_V4]
