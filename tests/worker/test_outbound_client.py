"""The guarded outbound client against loopback peers: it follows no redirect, reads a bounded
reply, ends at a total deadline however slowly the peer trickles, and connects to the address
the guard checked."""

from http.server import BaseHTTPRequestHandler

import pytest

from service.outbound import client, guard
from tests.worker.loopback import Flood, Trickle, answer, serving

ALLOW_SECOND_LOOPBACK = ["127.0.0.2"]  # 127.0.0.1 stays refused: the "internal" host


def test_a_redirect_to_a_refused_host_is_not_followed() -> None:
    with serving(lambda r: answer(r, 200, b"internal secret")) as internal:

        def redirect(request: BaseHTTPRequestHandler) -> None:
            answer(request, 307, b"", location=f"{internal.url}/admin")

        with serving(redirect, host="127.0.0.2") as allowed:
            reply = client.request(
                "POST", f"{allowed.url}/hook", ALLOW_SECOND_LOOPBACK, deadline=10, content=b"{}"
            )

    assert reply.status == 307 and not reply.ok
    assert internal.requests == []


def test_a_refused_host_gets_no_request() -> None:
    with serving(lambda r: answer(r, 200)) as internal, pytest.raises(guard.TargetRefused):
        client.request("GET", f"{internal.url}/", ALLOW_SECOND_LOOPBACK, deadline=10)

    assert internal.requests == []


def test_a_huge_reply_is_cut_at_the_bound_and_not_read_to_its_end() -> None:
    flood = Flood(500)
    with serving(flood, host="127.0.0.2") as receiver:
        reply = client.request(
            "POST", receiver.url, ALLOW_SECOND_LOOPBACK, deadline=30, content=b"{}"
        )
        assert flood.done.wait(30)  # the peer noticed the hang-up

    assert reply.status == 500 and reply.truncated
    assert len(reply.body) == client.ERROR_TEXT_BYTES
    assert len(reply.summary()) < client.ERROR_TEXT_BYTES + 20
    assert flood.written < flood.total // 4  # the rest was never pulled off the wire


def test_a_trickling_peer_is_cut_at_the_total_deadline() -> None:
    """A byte every 100 ms never trips a per-read timeout; the total deadline ends it."""
    trickle = Trickle(200)
    with serving(trickle, host="127.0.0.2") as receiver:
        try:
            with pytest.raises(client.OutboundError, match="no complete answer within 1 s"):
                client.request(
                    "GET", receiver.url, ALLOW_SECOND_LOOPBACK, deadline=1, max_reply=10_000
                )
        finally:
            trickle.released.set()


def test_the_client_connects_to_the_checked_address_with_the_name_as_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []

    def record_host(request: BaseHTTPRequestHandler) -> None:
        seen.append(request.headers["host"])
        answer(request, 204)

    with serving(record_host, host="127.0.0.2") as receiver:
        port = receiver.server_address[1]
        monkeypatch.setattr(guard, "resolve", lambda host, port: ["127.0.0.2"])
        reply = client.request(
            "GET", f"http://hooks.test:{port}/x", ALLOW_SECOND_LOOPBACK, deadline=10
        )

    assert reply.status == 204 and seen == [f"hooks.test:{port}"]


def test_proxies_from_the_environment_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(lambda r: answer(r, 200, b"proxy")) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("ALL_PROXY", proxy.url)
        with serving(lambda r: answer(r, 200, b"receiver"), host="127.0.0.2") as receiver:
            reply = client.request("GET", receiver.url, ALLOW_SECOND_LOOPBACK, deadline=10)

    assert reply.body == b"receiver" and proxy.requests == []
