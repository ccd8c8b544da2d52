"""The SDK's event stream: SSE framing as the spec has it, and resumption after a drop."""

from collections.abc import Iterator

import httpx
import pytest

from service.client import ApiError, Client

FIRST = b'id: 1\nevent: state\ndata: {"state": "running"}\n\n'
SECOND = b'id: 2\nevent: progress\ndata: {"percent":\ndata: 50}\n\n'  # one event, two data lines
THIRD = b'id: 3\nevent: state\ndata: {"state": "succeeded"}\n\n'


class Dropped(httpx.SyncByteStream):
    """A body that sends some bytes, then loses the connection."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        raise httpx.ReadError("connection reset")


def sse(stream: httpx.SyncByteStream | bytes) -> httpx.Response:
    headers = {"content-type": "text/event-stream"}
    if isinstance(stream, bytes):
        return httpx.Response(200, headers=headers, content=stream)
    return httpx.Response(200, headers=headers, stream=stream)


def test_a_dropped_stream_resumes_after_the_last_event_received() -> None:
    seen: list[str | None] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("last-event-id"))
        if len(seen) == 1:
            return sse(Dropped(FIRST, SECOND))
        return sse(THIRD)

    with Client("http://api", "key", transport=httpx.MockTransport(server)) as client:
        events = list(client.events("job"))

    assert events == [
        ("state", {"state": "running"}),
        ("progress", {"percent": 50}),
        ("state", {"state": "succeeded"}),
    ]
    assert seen == [None, "2"]


def test_keep_alive_comments_between_events_are_not_events() -> None:
    """FastAPI sends ": ping" after 15 s without events: a quiet scoring step of a big model."""

    def server(request: httpx.Request) -> httpx.Response:
        return sse(FIRST + b": ping\n\n" + b": ping\n\n" + THIRD)

    with Client("http://api", "key", transport=httpx.MockTransport(server)) as client:
        events = list(client.events("job"))

    assert events == [("state", {"state": "running"}), ("state", {"state": "succeeded"})]


def test_a_stream_that_keeps_dropping_gives_up_after_the_retries() -> None:
    calls = 0

    def server(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return sse(Dropped())

    with (
        Client("http://api", "key", transport=httpx.MockTransport(server)) as client,
        pytest.raises(httpx.ReadError),
    ):
        list(client.events("job", retries=1))
    assert calls == 2


def test_an_error_answer_is_an_api_error_not_a_retry() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        body = {"status": 404, "code": "job_not_found", "detail": "job 'x' does not exist"}
        return httpx.Response(404, json=body)

    with (
        Client("http://api", "key", transport=httpx.MockTransport(server)) as client,
        pytest.raises(ApiError) as raised,
    ):
        list(client.events("x"))
    assert raised.value.code == "job_not_found"
