"""/v1/models: upload, list, read, delete."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service.core.db import SessionsDep
from service.core.orm import Model
from service.core.pagination import MAX_LIMIT
from service.core.problems import found, responses
from service.core.store.dependency import StoreDep
from service.models import service
from service.models.schemas import MODEL_FORMATS, ModelOut, ModelPage
from service.tenants import repository as tenants
from service.tenants.auth import TenantDep
from service.uploads import service as uploads
from service.uploads.multipart import openapi_form

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    responses=responses(400, 401, 404, 409, 413, 415, 422, 429, 503, 507),
)


@router.post(
    "", status_code=201, openapi_extra=openapi_form(MODEL_FORMATS), response_model=ModelOut
)
async def upload_model(
    request: Request, tenant_id: TenantDep, sessions: SessionsDep, store: StoreDep
) -> Model:
    received = await uploads.receive(
        request, sessions, tenant_id, "model", MODEL_FORMATS, service.check
    )
    # The body is on disk; the request's sessions (quota check, create) each close in one
    # thread-pool call, so a slow body never holds a database connection.
    return await run_in_threadpool(service.create, sessions, store, tenant_id, received)


@router.get("", response_model=ModelPage)
def list_models(
    tenant_id: TenantDep,
    sessions: SessionsDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> ModelPage:
    with sessions() as session:
        rows, next_cursor = tenants.page(session, Model, tenant_id, limit, cursor)
    return ModelPage(items=[ModelOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{model_id}", response_model=ModelOut)
def read_model(model_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> Model:
    with sessions() as session:
        return found(tenants.owned(session, Model, tenant_id, model_id), "model", model_id)


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> Response:
    with sessions() as session:
        owned = tenants.owned(session, Model, tenant_id, model_id)
        uploads.delete_unless_used(session, found(owned, "model", model_id))
    return Response(status_code=204)
