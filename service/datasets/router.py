"""/v1/datasets: calibration, fine-tuning and evaluation data."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service import dataset_checks, resources
from service.auth import TenantDep
from service.datasets.schemas import DATASET_FORMATS, DatasetOut, DatasetPage
from service.db import SessionsDep
from service.orm import Dataset
from service.pagination import MAX_LIMIT
from service.problems import ProblemError
from service.settings import get_settings
from service.uploads import Upload, openapi_form, receive_upload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post(
    "", status_code=201, openapi_extra=openapi_form(DATASET_FORMATS), response_model=DatasetOut
)
async def upload_dataset(request: Request, tenant_id: TenantDep, sessions: SessionsDep) -> Dataset:
    settings = get_settings()
    upload = await receive_upload(request, settings.home / "tmp", settings.max_upload_bytes)
    with resources.discard_on_error(upload):
        dataset_format = upload.fields.get("format", "")
        if dataset_format not in DATASET_FORMATS:
            raise ProblemError(
                422,
                "unsupported_format",
                f"dataset format must be one of {DATASET_FORMATS}, got {dataset_format!r}",
            )
        name = resources.resource_name(upload)
        await run_in_threadpool(_check, upload, dataset_format)
    # The body is on disk: only now does the request touch the database, in the thread pool.
    return await run_in_threadpool(_save, sessions, tenant_id, upload, name, dataset_format)


def _save(
    sessions: sessionmaker[Session], tenant_id: str, upload: Upload, name: str, dataset_format: str
) -> Dataset:
    blob = resources.store_upload(upload)
    dataset = Dataset(
        tenant_id=tenant_id,
        name=name,
        format=dataset_format,
        blob_key=blob.key,
        sha256=blob.sha256,
        size=blob.size,
    )
    with sessions() as session:
        session.add(dataset)
        session.commit()
    return dataset


def _check(upload: Upload, dataset_format: str) -> None:
    try:
        dataset_checks.check(upload.path, dataset_format)
    except dataset_checks.InvalidDataset as error:
        raise ProblemError(422, error.code, str(error)) from error


@router.get("", response_model=DatasetPage)
def list_datasets(
    tenant_id: TenantDep,
    sessions: SessionsDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> DatasetPage:
    with sessions() as session:
        rows, next_cursor = resources.page(session, Dataset, tenant_id, limit, cursor)
    return DatasetPage(items=[DatasetOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetOut)
def read_dataset(dataset_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> Dataset:
    with sessions() as session:
        return resources.owned(session, Dataset, tenant_id, dataset_id)


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> Response:
    with sessions() as session:
        resources.delete_unless_used(
            session, resources.owned(session, Dataset, tenant_id, dataset_id)
        )
    return Response(status_code=204)
