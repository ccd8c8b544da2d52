"""Requests whose bodies arrive chunk by chunk, and a count of what the app read of them.

Starlette's TestClient reads a request's whole body into one ASGI message; httpx's ASGI
transport hands the app one message per chunk, as a server does, so a test can tell "refused
at the chunk that crossed the cap" from "read to the end, then refused"."""

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass
class Pulled:
    """What the app read of the request body: its messages, and their bytes."""

    messages: int = 0
    bytes: int = 0


def post(
    app: ASGIApp, path: str, headers: dict[str, str], body: bytes | Sequence[bytes]
) -> tuple[httpx.Response, Pulled]:
    """POST `body` to `app`: bytes with a Content-Length, or chunks sent chunked, one ASGI
    message each. Returns the answer and what the app pulled from `receive` before it."""
    pulled = Pulled()

    async def counted_app(scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                pulled.messages += 1
                pulled.bytes += len(message.get("body", b""))
            return message

        await app(scope, counted, send)

    async def chunks(parts: Sequence[bytes]) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async def request() -> httpx.Response:
        content = body if isinstance(body, bytes) else chunks(body)
        transport = httpx.ASGITransport(app=counted_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post(path, content=content, headers=headers)

    return asyncio.run(request()), pulled
