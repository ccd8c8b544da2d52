"""The one HTTP client for addresses a tenant names: webhook receivers and MLflow tracking
servers (DESIGN §7).

Each request parses its URL once and checks it with the guard, connects to exactly the address
the guard checked (the name goes in Host and in TLS: SNI and the certificate check), follows no
redirect, keeps at most `max_reply` bytes of the answer and ends at a total deadline — not a
per-read timeout, which a peer trickling a byte at a time never trips. httpx has no total
deadline of its own, so requests run on asyncio under `asyncio.timeout`; `request` runs one
from synchronous code.
"""

import asyncio
from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass

import httpx

from service.outbound import guard

ERROR_TEXT_BYTES = 2048  # what of a failed answer is kept for a job's result or a delivery


class OutboundError(Exception):
    """No answer: the guard refused the URL, the connection failed, or the deadline passed."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: httpx.Headers
    body: bytes  # at most the `max_reply` bytes asked for
    truncated: bool  # the peer had more to say than we read

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def summary(self) -> str:
        """The status and the start of the body, for a one-line error."""
        text = self.body[:ERROR_TEXT_BYTES].decode(errors="replace").strip()
        more = "…" if self.truncated or len(self.body) > ERROR_TEXT_BYTES else ""
        return f"HTTP {self.status}: {text}{more}" if text else f"HTTP {self.status}"


async def send(
    method: str,
    url: str,
    allow: list[str],
    *,
    deadline: float,
    max_reply: int = ERROR_TEXT_BYTES,
    content: bytes | AsyncIterable[bytes] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """Send one request to `url` if the guard lets it through; `OutboundError` if no answer
    came within `deadline` seconds (checking the URL, resolving, connecting, sending and
    reading all count), `guard.TargetRefused` if the guard refused it."""
    try:
        async with asyncio.timeout(deadline):
            target = await asyncio.to_thread(guard.check, url, allow)
            return await _exchange(method, target, deadline, max_reply, content, headers)
    except TimeoutError as error:
        raise OutboundError(f"no complete answer within {deadline:g} s") from error
    except httpx.HTTPError as error:
        raise OutboundError(f"{type(error).__name__}: {error}"[:ERROR_TEXT_BYTES]) from error


def request(
    method: str,
    url: str,
    allow: list[str],
    *,
    deadline: float,
    max_reply: int = ERROR_TEXT_BYTES,
    content: bytes | AsyncIterable[bytes] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """`send` from synchronous code (a thread with no event loop of its own)."""
    call = send(
        method,
        url,
        allow,
        deadline=deadline,
        max_reply=max_reply,
        content=content,
        headers=headers,
    )
    return asyncio.run(call)


async def _exchange(
    method: str,
    target: guard.Target,
    deadline: float,
    max_reply: int,
    content: bytes | AsyncIterable[bytes] | None,
    headers: Mapping[str, str] | None,
) -> Reply:
    url = target.url
    sent_headers = {
        **(headers or {}),
        "host": url.netloc.decode(),
        "accept-encoding": "identity",  # the body we count is the body we keep
    }
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    # trust_env=False: no proxy, netrc or certificate setting from the worker's environment
    # decides where the request goes or what it carries.
    async with httpx.AsyncClient(timeout=deadline, trust_env=False) as client:
        outgoing = client.build_request(
            method,
            url.copy_with(host=target.address),
            content=content,
            headers=sent_headers,
            extensions=extensions,
        )
        response = await client.send(outgoing, follow_redirects=False, stream=True)
        try:
            body = bytearray()
            truncated = False
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > max_reply:
                    del body[max_reply:]
                    truncated = True
                    break  # closing the response drops the connection, unread
        finally:
            await response.aclose()
    return Reply(response.status_code, response.headers, bytes(body), truncated)
