"""Every request body is capped before it is read, by route and whatever its content type: an
upload (a POST to an upload path) at the upload cap plus what its form fields may add, any other
body at 1 MiB. A declared length over the cap is a 413 before a byte is read; a chunked body, or
one whose length lied, is counted as it arrives and cut at the cap.

A /v1 request without a well-formed bearer key is answered 401 here, before its body is read:
FastAPI reads a route's body before it solves the route's key dependency. A key that is
well-formed but unknown is still answered by that dependency, after at most the cap was read.

Plain ASGI, like the metrics middleware: Starlette has no per-request body limit of its own.
"""

from collections.abc import Collection

from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.problems import ProblemError, problem_response
from service.core.settings import get_settings
from service.uploads.multipart import FORM_ALLOWANCE, upload_too_large

MAX_JSON_BYTES = 1024 * 1024  # a job spec is a few hundred bytes
KEYED_PREFIX = "/v1/"  # every route under it needs a key (a test holds the routes to it)


class BodyLimitMiddleware:
    def __init__(
        self, app: ASGIApp, upload_paths: Collection[str], max_json_bytes: int = MAX_JSON_BYTES
    ) -> None:
        self.app = app
        self.upload_paths = frozenset(upload_paths)
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(KEYED_PREFIX) and not _has_bearer_key(scope):
            # The same answer as the key dependency's (`service.tenants.auth`), without reading
            # the body.
            unauthenticated = ProblemError(
                401, "unauthenticated", "send 'Authorization: Bearer <api key>'"
            )
            await _refuse(unauthenticated, scope, receive, send)
            return
        max_bytes, too_large = self._cap(scope)
        declared = _content_length(scope)
        if declared is not None and declared > max_bytes:
            await _refuse(too_large, scope, receive, send)
            return
        received = 0
        refused = False

        async def counted() -> Message:
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_bytes and not refused:  # chunked, or a length that lied
                refused = True
                await _refuse(too_large, scope, receive, send)
                return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped
            return message

        async def unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted, unless_refused)
        except ClientDisconnect:
            if not refused:  # the client did go away
                raise
            # What an upload route raises at the disconnect we made up: answered already.

    def _cap(self, scope: Scope) -> tuple[int, ProblemError]:
        """The most bytes this request's body may have, and the problem past them."""
        if scope["method"] == "POST" and scope["path"] in self.upload_paths:
            # The parser stops a well-formed form first (at its file and field caps); this
            # bounds what it skips: a preamble, an epilogue.
            max_upload_bytes = get_settings().max_upload_bytes
            return max_upload_bytes + FORM_ALLOWANCE, upload_too_large(max_upload_bytes)
        uploads = " or ".join(sorted(self.upload_paths))
        detail = (
            f"the request body exceeds {self.max_json_bytes} bytes; send files to POST {uploads}"
        )
        return self.max_json_bytes, ProblemError(413, "body_too_large", detail)


async def _refuse(problem: ProblemError, scope: Scope, receive: Receive, send: Send) -> None:
    await problem_response(problem.status, problem.code, problem.detail)(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key.lower() == name), None)


def _has_bearer_key(scope: Scope) -> bool:
    """`Authorization: Bearer <something>`, read as `HTTPBearer` and `current_tenant` read it."""
    authorization = (_header(scope, b"authorization") or b"").decode("latin-1")
    scheme, credentials = get_authorization_scheme_param(authorization)
    return scheme.lower() == "bearer" and bool(credentials)


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None
