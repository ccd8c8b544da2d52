"""Where workers may send requests for a job (its `notify_url`, its MLflow server): the SSRF
guard.

A URL whose host resolves to a loopback, private, link-local, multicast, reserved or
unspecified address could make our workers reach what only they can reach (a metadata
service, a database): refused unless the operator allow-lists the host or its network
(`APOPTOSIS_WEBHOOK_ALLOW`). An IPv6 address that carries an IPv4 address (mapped, NAT64,
6to4, Teredo, IPv4-compatible, SIIT) is judged by the IPv4 address a translator would reach.

The URL is parsed here once, and `Target` carries the parse and the addresses checked: the
client (`service.outbound.client`) connects to one of exactly these, so no second parser or
second DNS lookup can disagree with the guard. Checked at submit and again before every
request, as DNS answers change.
"""

import ipaddress
import socket
from dataclasses import dataclass

import httpx

from service.core.errors import CodedError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# NAT64 (RFC 6052) maps IPv4 into the low 32 bits of 64:ff9b::/96; 64:ff9b:1::/48 is the
# local-use range (RFC 8215), translated however the site chooses: never public. `::/96`
# (IPv4-compatible, deprecated) and `::ffff:0:0:0/96` (SIIT) also end in an IPv4 address.
_LOW_32_BITS_IPV4 = tuple(
    ipaddress.IPv6Network(net) for net in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96")
)
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


class TargetRefused(CodedError):
    def __init__(self, message: str) -> None:
        super().__init__("url_refused", message)


@dataclass(frozen=True)
class Target:
    """A URL that passed the guard: its one parse and the addresses it may be reached at."""

    url: httpx.URL
    addresses: list[str]

    @property
    def address(self) -> str:
        """The address to connect to (an IPv6 zone dropped)."""
        return self.addresses[0].split("%")[0]


def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (tests replace this with a resolver that lies)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def parse(url: str) -> httpx.URL:
    """The URL as the client will read it; `TargetRefused` for anything but a plain http(s) URL
    with a host (a backslash is read as a slash by browsers and as data by others: refused)."""
    if "\\" in url or any(ord(c) < 0x21 or 0x7F <= ord(c) <= 0x9F for c in url):
        raise TargetRefused(f"the URL has a backslash, a space or a control character: {url!r}")
    try:
        parsed = httpx.URL(url)
        port = parsed.port  # validates the port's range
    except (httpx.InvalidURL, ValueError, UnicodeError) as error:
        raise TargetRefused(f"not a valid URL ({error}): {url!r}") from error
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise TargetRefused(f"not an http(s) URL with a host: {url!r}")
    if port is not None and not 0 < port < 65536:
        raise TargetRefused(f"the port {port} is out of range: {url!r}")
    return parsed


def check(url: str, allow: list[str]) -> Target:
    """The parsed URL and the addresses of its host; `TargetRefused` unless each address is
    public or allowed."""
    parsed = parse(url)
    host = parsed.host
    try:
        addresses = resolve(host, parsed.port or (443 if parsed.scheme == "https" else 80))
    except (OSError, UnicodeError) as error:
        raise TargetRefused(f"the host {host!r} does not resolve: {error}") from error
    if not addresses:
        raise TargetRefused(f"the host {host!r} has no address")
    if host in allow:
        return Target(parsed, addresses)
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])  # drop an IPv6 zone
        if not public(address) and not _allowed(address, allow):
            raise TargetRefused(
                f"the host {host!r} resolves to {address}, a non-public address; "
                "the operator can allow it with APOPTOSIS_WEBHOOK_ALLOW"
            )
    return Target(parsed, addresses)


def public(address: Address) -> bool:
    """Whether a worker may connect to `address` without the operator's leave."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return False
        embedded = embedded_ipv4s(address)
        if embedded:
            return all(public(inner) for inner in embedded)
    return address.is_global and not address.is_multicast


def embedded_ipv4s(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries for a translator or tunnel to reach."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)  # (server, client)
    if any(address in network for network in _LOW_32_BITS_IPV4):
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def _allowed(address: Address, allow: list[str]) -> bool:
    for entry in allow:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:  # a host name: matched on the URL, not on addresses
            continue
    return False
