"""Where workers may send requests for a job (its `notify_url`, its MLflow server): the SSRF
guard.

A URL whose host resolves to a loopback, private, link-local, multicast, reserved or
unspecified address could make our workers reach what only they can reach (a metadata
service, a database): refused unless the operator allow-lists the host or its network
(`APOPTOSIS_WEBHOOK_ALLOW`). Checked at submit and again before every delivery, as DNS answers
change.
"""

import ipaddress
import socket
from urllib.parse import urlsplit

from service.errors import CodedError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(CodedError):
    def __init__(self, message: str) -> None:
        super().__init__("url_refused", message)


def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (tests replace this with a resolver that lies)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def check(url: str, allow: list[str]) -> list[str]:
    """The addresses of the URL's host; `TargetRefused` unless each is public or allowed. A
    sender connects to one of these, so a second lookup cannot answer differently."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise TargetRefused(f"not an http(s) URL with a host: {url!r}")
    try:
        addresses = resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError) as error:
        raise TargetRefused(f"the host {host!r} does not resolve: {error}") from error
    if host in allow:
        return addresses
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])  # drop an IPv6 zone
        if not _public(address) and not _allowed(address, allow):
            raise TargetRefused(
                f"the host {host!r} resolves to {address}, a non-public address; "
                "the operator can allow it with APOPTOSIS_WEBHOOK_ALLOW"
            )
    return addresses


def _public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _public(address.ipv4_mapped)
    return address.is_global and not address.is_multicast


def _allowed(address: Address, allow: list[str]) -> bool:
    for entry in allow:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:  # a host name: matched on the URL, not on addresses
            continue
    return False
