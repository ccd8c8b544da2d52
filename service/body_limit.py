"""A cap on request bodies other than uploads (JSON: job specs): a body over it is a 413 as soon
as its declared length or its bytes so far pass the cap, never parsed whole. Uploads stream to
disk under their own cap (`uploads/multipart.py`).

Plain ASGI, like the metrics middleware: Starlette has no per-request body limit of its own.
"""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import problem_response

MAX_JSON_BYTES = 1024 * 1024  # a job spec is a few hundred bytes


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_JSON_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_multipart(scope):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await problem_response(413, "body_too_large", self._detail())(scope, receive, send)
            return
        received = 0
        refused = False

        async def counted() -> Message:
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes and not refused:  # chunked, or a length that lied
                refused = True
                await problem_response(413, "body_too_large", self._detail())(scope, receive, send)
                return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped
            return message

        async def unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)

    def _detail(self) -> str:
        return f"the request body exceeds {self.max_bytes} bytes"


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key.lower() == name), None)


def _is_multipart(scope: Scope) -> bool:
    return (_header(scope, b"content-type") or b"").lower().startswith(b"multipart/form-data")


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None
