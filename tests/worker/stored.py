"""Rows a job's worker reads, stored as the API would store them: a model's and a dataset's
blobs in the store, their rows and a queued job in the database (the `tenant` fixture's)."""

from pathlib import Path
from typing import Any

from service.core.db import get_sessionmaker
from service.core.orm import Dataset, Job, Model
from service.core.store import store_file
from tests.worker import factories


def stored_model(tenant: str, archive: Path) -> str:
    blob = store_file(archive)
    with get_sessionmaker()() as session:
        model = Model(
            tenant_id=tenant,
            name="m",
            format="hf",
            blob_key=blob.key,
            sha256=blob.sha256,
            size=blob.size,
        )
        session.add(model)
        session.commit()
        return model.id


def stored_bert(tenant: str, root: Path) -> str:
    return stored_model(tenant, factories.zip_folder(factories.bert_folder(root), root / "b.zip"))


def stored_job(tenant: str, model_id: str, root: Path, spec: dict[str, Any]) -> str:
    """A queued job on the model, with a small tensors dataset, as the API would store it."""
    blob = store_file(factories.tensors_file(root / "d.safetensors"))
    with get_sessionmaker()() as session:
        dataset = Dataset(
            tenant_id=tenant,
            name="d",
            format="tensors",
            blob_key=blob.key,
            sha256=blob.sha256,
            size=blob.size,
        )
        session.add(dataset)
        session.flush()
        job = Job(tenant_id=tenant, model_id=model_id, dataset_id=dataset.id, spec=spec)
        session.add(job)
        session.commit()
        return job.id
