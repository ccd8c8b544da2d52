"""What the service tests build: rows in the test's database (a tenant and its key, models,
datasets, jobs, artifacts), and valid Hugging Face archives and safetensors bytes without torch."""

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from service.blobs import repository as blobs
from service.core.orm import Artifact, Dataset, Job, Model
from service.core.store import ArtifactStore
from service.jobs.states import JobState
from service.tenants.auth import create_tenant


def safetensors_bytes(data: bytes, *, lie: int = 0) -> bytes:
    """One uint8 tensor holding `data`; `lie` shifts the end offset the header claims."""
    header = json.dumps(
        {"weight": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data) + lie]}}
    ).encode()
    return len(header).to_bytes(8, "little") + header + data


def hf_archive(
    data: bytes,
    *,
    config: object | None = None,
    weights_name: str = "model.safetensors",
    weights: bytes | None = None,
) -> bytes:
    """A zip of config.json and safetensors weights, stored uncompressed."""
    config = {"architectures": ["BertModel"], "model_type": "bert"} if config is None else config
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as bundle:
        bundle.writestr("config.json", json.dumps(config))
        bundle.writestr(weights_name, safetensors_bytes(data) if weights is None else weights)
    return buffer.getvalue()


def hf_archive_of_size(total: int) -> bytes:
    """A valid archive of exactly `total` bytes (the tensor absorbs the difference)."""
    size = max(0, total - len(hf_archive(b"")))
    for _ in range(10):  # the header's digits grow with the size: converge in a few rounds
        archive = hf_archive(b"\1" * size)
        if len(archive) == total:
            return archive
        size += total - len(archive)
    raise AssertionError(f"cannot build an archive of exactly {total} bytes")


# --- rows ----------------------------------------------------------------------------------

WORKER = "worker-1"
SPEC: dict[str, Any] = {"target": {"macs": 0.5}}  # plus model_id and dataset_id


@dataclass(frozen=True)
class Caller:
    """A tenant and one of its API keys, as a client holds it."""

    tenant_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_tenant(session: Session, name: str = "tenant") -> Caller:
    tenant, key = create_tenant(session, name)
    session.commit()
    return Caller(tenant.id, key)


def _digest(content: bytes) -> tuple[str, str]:
    sha = hashlib.sha256(content).hexdigest()
    return sha, f"sha256/{sha[:2]}/{sha}"


def make_model(
    session: Session,
    tenant_id: str,
    *,
    state: str = "ready",
    name: str = "model",
    created_at: datetime | None = None,
) -> Model:
    sha, key = _digest(name.encode())
    model = Model(
        tenant_id=tenant_id,
        name=name,
        format="hf",
        state=state,
        blob_key=key,
        sha256=sha,
        size=len(name),
    )
    if created_at is not None:
        model.created_at = created_at
    session.add(model)
    session.commit()
    return model


def make_dataset(
    session: Session, tenant_id: str, *, name: str = "data", created_at: datetime | None = None
) -> Dataset:
    sha, key = _digest(name.encode())
    dataset = Dataset(
        tenant_id=tenant_id, name=name, format="tensors", blob_key=key, sha256=sha, size=len(name)
    )
    if created_at is not None:
        dataset.created_at = created_at
    session.add(dataset)
    session.commit()
    return dataset


def make_job(
    session: Session,
    tenant_id: str,
    state: str = "queued",
    *,
    model: Model | None = None,
    dataset: Dataset | None = None,
    created_at: datetime | None = None,
) -> Job:
    """A job row in `state`; running and cancelling jobs hold WORKER's lease."""
    model = model or make_model(session, tenant_id)
    dataset = dataset or make_dataset(session, tenant_id)
    leased = state in (JobState.RUNNING, JobState.CANCELLING)
    job = Job(
        tenant_id=tenant_id,
        model_id=model.id,
        dataset_id=dataset.id,
        spec={**SPEC, "model_id": model.id, "dataset_id": dataset.id},
        state=state,
        attempt=1 if leased else 0,
        lease_owner=WORKER if leased else None,
    )
    if created_at is not None:
        job.created_at = created_at
    session.add(job)
    session.commit()
    return job


def make_artifact(session: Session, store: ArtifactStore, job: Job, content: bytes) -> Artifact:
    blob = store.put_stream([content])
    artifact = Artifact(
        tenant_id=job.tenant_id,
        job_id=job.id,
        format="hf",
        filename="pruned.zip",
        blob_key=blob.key,
        sha256=blob.sha256,
        size=blob.size,
    )
    session.add(artifact)
    blobs.record(session, blob)
    session.commit()
    return artifact
