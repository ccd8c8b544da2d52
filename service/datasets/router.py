"""/v1/datasets: calibration, fine-tuning and evaluation data: upload, list, read, delete."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service.core.db import SessionsDep
from service.core.orm import Dataset
from service.core.pagination import MAX_LIMIT
from service.core.problems import found, responses
from service.core.store.dependency import StoreDep
from service.datasets import service
from service.datasets.schemas import DATASET_FORMATS, DatasetOut, DatasetPage
from service.tenants import repository as tenants
from service.tenants.auth import TenantDep
from service.uploads import service as uploads
from service.uploads.multipart import openapi_form

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    responses=responses(400, 401, 404, 409, 413, 415, 422, 429, 503, 507),
)


@router.post(
    "", status_code=201, openapi_extra=openapi_form(DATASET_FORMATS), response_model=DatasetOut
)
async def upload_dataset(
    request: Request, tenant_id: TenantDep, sessions: SessionsDep, store: StoreDep
) -> Dataset:
    received = await uploads.receive(
        request, sessions, tenant_id, "dataset", DATASET_FORMATS, service.check
    )
    # The body is on disk; the request's sessions (quota check, create) each close in one
    # thread-pool call, so a slow body never holds a database connection.
    return await run_in_threadpool(service.create, sessions, store, tenant_id, received)


@router.get("", response_model=DatasetPage)
def list_datasets(
    tenant_id: TenantDep,
    sessions: SessionsDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> DatasetPage:
    with sessions() as session:
        rows, next_cursor = tenants.page(session, Dataset, tenant_id, limit, cursor)
    return DatasetPage(items=[DatasetOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetOut)
def read_dataset(dataset_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> Dataset:
    with sessions() as session:
        return found(tenants.owned(session, Dataset, tenant_id, dataset_id), "dataset", dataset_id)


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> Response:
    with sessions() as session:
        dataset = found(
            tenants.owned(session, Dataset, tenant_id, dataset_id), "dataset", dataset_id
        )
        uploads.delete_unless_used(session, dataset)
    return Response(status_code=204)
