"""/v1/artifacts/{id}/content: streamed downloads with a strong ETag (the sha256)."""

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from service.core.db import SessionsDep
from service.core.orm import Artifact
from service.core.problems import ProblemError, found, responses
from service.core.store.dependency import StoreDep
from service.tenants import repository as tenants
from service.tenants.auth import TenantDep

router = APIRouter(
    prefix="/v1/artifacts", tags=["artifacts"], responses=responses(401, 404, 422, 503)
)
_BYTES = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
# StreamingResponse has no media type of its own: these are the content the document declares.
_DOWNLOAD: dict[int | str, dict[str, Any]] = {
    200: {"description": "the artifact's bytes", "content": _BYTES},
    206: {"description": "the bytes of the one range asked for", "content": _BYTES},
    304: {"description": "If-None-Match names the artifact's ETag: no body"},
    **responses(416),
}
# RFC 9110 §14.1.2, exactly: one `first-last`, `first-` or `-count` range, no spaces, no list.
# ASCII digits only (not the '²' a latin-1 header may hold); at most 19, as no blob is larger
# and int() of thousands of digits raises.
_ONE_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})", re.IGNORECASE)


@router.get(
    "/{artifact_id}/content",
    response_model=None,
    response_class=StreamingResponse,
    responses=_DOWNLOAD,
)
@router.head(
    "/{artifact_id}/content",
    response_model=None,
    response_class=StreamingResponse,
    responses=_DOWNLOAD,
)
def download(
    artifact_id: str,
    request: Request,
    tenant_id: TenantDep,
    sessions: SessionsDep,
    store: StoreDep,
    if_none_match: Annotated[str | None, Header()] = None,
    range_: Annotated[str | None, Header(alias="range")] = None,
) -> Response:
    """The artifact's bytes (`HEAD`: its headers only). One `Range: bytes=…` range is served
    as 206 Partial Content, so a broken download resumes where it stopped; any other Range is
    a 416 `range_not_satisfiable`."""
    with sessions() as session:
        owned = tenants.owned(session, Artifact, tenant_id, artifact_id)
        artifact = found(owned, "artifact", artifact_id)
    etag = f'"{artifact.sha256}"'
    if if_none_match is not None and _matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    headers = {"ETag": etag, "Accept-Ranges": "bytes"}
    start, length, status = 0, artifact.size, 200
    if range_ is not None:
        wanted = _byte_range(range_, artifact.size)
        if wanted is None:
            raise ProblemError(
                416,
                "range_not_satisfiable",
                f"Range must be one byte range within the {artifact.size} bytes: "
                "bytes=first-last, bytes=first- or bytes=-count",
                headers=headers | {"Content-Range": f"bytes */{artifact.size}"},
            )
        start, end = wanted
        length, status = end - start + 1, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{artifact.size}"
    headers["Content-Length"] = str(length)
    headers["Content-Disposition"] = f'attachment; filename="{artifact.filename}"'
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(
        store.iter_chunks(artifact.blob_key, start=start, length=length),
        status_code=status,
        media_type="application/octet-stream",
        headers=headers,
    )


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The first and last byte of one `bytes=a-b`, `bytes=a-` or `bytes=-n` range within
    `size`; None when it is not exactly one satisfiable range (several ranges are not served)."""
    # a server strips the whitespace around a field's value; inside it, none is allowed
    one = _ONE_RANGE.fullmatch(header.strip(" \t"))
    if one is None:
        return None
    first, last = one.groups()
    if not first:  # the last n bytes
        count = int(last or 0)
        return (max(0, size - count), size - 1) if count and size else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    return (start, end) if start <= end and start < size else None


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison: `*`, or any listed tag equal to ours ignoring `W/`."""
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag in tags
