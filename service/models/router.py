"""/v1/models: upload, list, read, delete."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service import archives, queue, resources
from service.auth import TenantDep
from service.db import SessionsDep
from service.models.schemas import MODEL_FORMATS, ModelOut, ModelPage
from service.orm import Model
from service.pagination import MAX_LIMIT
from service.problems import ProblemError
from service.settings import get_settings
from service.uploads import Upload, openapi_form, receive_upload

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post(
    "", status_code=201, openapi_extra=openapi_form(MODEL_FORMATS), response_model=ModelOut
)
async def upload_model(request: Request, tenant_id: TenantDep, sessions: SessionsDep) -> Model:
    settings = get_settings()
    upload = await receive_upload(request, settings.home / "tmp", settings.max_upload_bytes)
    with resources.discard_on_error(upload):
        model_format = upload.fields.get("format", "")
        if model_format not in MODEL_FORMATS:
            raise ProblemError(
                422,
                "unsupported_format",
                f"model format must be one of {MODEL_FORMATS}, got {model_format!r}",
            )
        if model_format == "torch_pickle" and not settings.trusted_mode:
            raise ProblemError(
                422,
                "unsafe_format",
                "torch_pickle uploads run code when loaded; the operator has not "
                "enabled trusted mode. Upload a Hugging Face directory (format hf).",
            )
        name = resources.resource_name(upload)
        if model_format == "hf":
            await run_in_threadpool(_check_hf, upload, settings.trusted_mode)
    # The body is on disk: only now does the request touch the database, in the thread pool.
    return await run_in_threadpool(_save, sessions, tenant_id, upload, name, model_format)


def _save(
    sessions: sessionmaker[Session], tenant_id: str, upload: Upload, name: str, model_format: str
) -> Model:
    blob = resources.store_upload(upload)
    model = Model(
        tenant_id=tenant_id,
        name=name,
        format=model_format,
        blob_key=blob.key,
        sha256=blob.sha256,
        size=blob.size,
    )
    with sessions() as session:
        session.add(model)
        session.commit()
    queue.enqueue_validation(model.id)
    return model


def _check_hf(upload: Upload, trusted: bool) -> None:
    """Refuse a hostile or broken archive now (422); the worker loads the rest."""
    try:
        archives.check_hf_upload(upload.path, trusted=trusted)
    except archives.UnsafeArchive as error:
        raise ProblemError(422, error.code, str(error)) from error


@router.get("", response_model=ModelPage)
def list_models(
    tenant_id: TenantDep,
    sessions: SessionsDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: str | None = None,
) -> ModelPage:
    with sessions() as session:
        rows, next_cursor = resources.page(session, Model, tenant_id, limit, cursor)
    return ModelPage(items=[ModelOut.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/{model_id}", response_model=ModelOut)
def read_model(model_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> Model:
    with sessions() as session:
        return resources.owned(session, Model, tenant_id, model_id)


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, tenant_id: TenantDep, sessions: SessionsDep) -> Response:
    with sessions() as session:
        resources.delete_unless_used(session, resources.owned(session, Model, tenant_id, model_id))
    return Response(status_code=204)
