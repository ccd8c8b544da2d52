"""RFC 9457 problem details: one error type per failure a client can act on, stable `code`s."""

import logging
import uuid
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.core.store.base import StoreFull, StoreUnavailable

log = logging.getLogger("apoptosis.api")
PROBLEM_JSON = "application/problem+json"
Row = TypeVar("Row")


class ProblemError(Exception):
    """An expected failure, rendered as application/problem+json."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}  # e.g. Retry-After on a 429
        self.extra = extra


def not_found(kind: str, resource_id: str) -> ProblemError:
    """Missing and other tenants' resources look the same: a 404."""
    return ProblemError(404, f"{kind}_not_found", f"{kind} {resource_id!r} does not exist")


def found(row: Row | None, kind: str, resource_id: str) -> Row:
    """`row`, or a 404 `<kind>_not_found` when the lookup found nothing."""
    if row is None:
        raise not_found(kind, resource_id)
    return row


_PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "code", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "code": {"type": "string"},
        "detail": {"type": "string"},
    },
}
_MEANING = {
    400: "a malformed request (cursor, multipart body)",
    401: "no API key, or one unknown or revoked",
    404: "no such resource for this tenant",
    409: "the resource's state does not allow it",
    413: "the body or upload is over its limit",
    415: "the upload is not multipart/form-data",
    416: "the Range is not one satisfiable byte range; Content-Range has the size",
    422: "the request or its content is not valid",
    429: "a tenant limit is reached; see Retry-After",
    503: "a dependency (the broker or the store) is unavailable; see Retry-After",
    507: "the artifact store is full",
}
STORE_RETRY_AFTER_SECONDS = 30


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the problems an operation answers with (RFC 9457 bodies)."""
    return {
        status: {
            "description": _MEANING[status],
            "content": {PROBLEM_JSON: {"schema": _PROBLEM_SCHEMA}},
        }
        for status in statuses
    }


def problem_response(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    body = {
        "type": f"https://apoptosis.dev/problems/{code}",
        "title": code.replace("_", " "),
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def install(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, error: ProblemError) -> JSONResponse:
        response = problem_response(error.status, error.code, error.detail, **error.extra)
        response.headers.update(error.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in error.errors()]
        return problem_response(422, "invalid_request", "the request is not valid", errors=errors)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return problem_response(error.status_code, code, str(error.detail))

    @app.exception_handler(StoreFull)
    async def _store_full(request: Request, error: StoreFull) -> JSONResponse:
        return problem_response(507, "insufficient_storage", str(error))

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(request: Request, error: StoreUnavailable) -> JSONResponse:
        response = problem_response(503, error.code, str(error))
        response.headers["Retry-After"] = str(STORE_RETRY_AFTER_SECONDS)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex
        log.exception("unhandled error %s on %s %s", error_id, request.method, request.url.path)
        return problem_response(
            500, "internal_error", "an unexpected error occurred", error_id=error_id
        )
