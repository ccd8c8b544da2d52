"""/v1/artifacts/{id}/content: streamed downloads with a strong ETag (the sha256)."""

from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import StreamingResponse

from service.auth import TenantDep
from service.db import SessionsDep
from service.orm import Artifact
from service.problems import found, responses
from service.store.dependency import StoreDep
from service.tenants import repository as tenants

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"], responses=responses(401, 404))


@router.get("/{artifact_id}/content", response_model=None)
def download(
    artifact_id: str,
    tenant_id: TenantDep,
    sessions: SessionsDep,
    store: StoreDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    with sessions() as session:
        owned = tenants.owned(session, Artifact, tenant_id, artifact_id)
        artifact = found(owned, "artifact", artifact_id)
    etag = f'"{artifact.sha256}"'
    if if_none_match is not None and _matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    return StreamingResponse(
        store.iter_chunks(artifact.blob_key),
        media_type="application/octet-stream",
        headers={
            "ETag": etag,
            "Content-Length": str(artifact.size),
            "Content-Disposition": f'attachment; filename="{artifact.filename}"',
        },
    )


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison: `*`, or any listed tag equal to ours ignoring `W/`."""
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag in tags
