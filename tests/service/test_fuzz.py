"""Schemathesis over the OpenAPI document: every operation, called with a valid tenant key and
generated data (valid and invalid), never answers 5xx and answers only what the document
declares: its status codes, content types and body schemas.

Half the generated cases are steered to alice's own resources (a finished job, its model,
dataset and artifact) and to uploads and job specs that can succeed, so the 200s, 201s and 202s
are checked too, not only the 404s and 422s of random ids and bytes.

CI-sized and deterministic: a few examples per operation from a fixed seed.
"""

from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.orm import Session

from service.api.app import create_app
from service.core import queue
from service.core.store import ArtifactStore
from service.jobs import repository as jobs
from service.outbound import guard
from service.workers import repository as workers
from tests.service.factories import (
    Caller,
    hf_archive,
    make_artifact,
    make_job,
    safetensors_bytes,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
CONFIG = {
    "seed": 20260101,
    "generation": {"max-examples": 25, "deterministic": True, "database": "none"},
}
# A file each upload format accepts (imagefolder: none, its uploads stay random and refused).
VALID_FILES = {
    "hf": hf_archive(b"weights"),
    "jsonl": b'{"text": "a row", "label": 1}\n',
    "tensors": safetensors_bytes(b"\1\2\3\4"),
}
# Path parameter (and spec field) -> alice's resource: filled by the `alices` fixture per test.
ALICES: dict[str, str] = {}


# The document the app serves at /openapi.json, built at import as test_isolation.py builds it;
# each call goes to the test's own app (`app=`). Not `openapi.from_asgi` at import: it runs the
# app's lifespan (a spool sweep) under this machine's settings, not a test's. Nor
# `schemathesis.pytest.from_fixture`: it sets Node._nodeid, which pytest 9.2 no longer has.
schema = schemathesis.openapi.from_dict(
    create_app().openapi(), config=schemathesis.Config.from_dict(CONFIG)
)


@schema.hook
def flatmap_path_parameters(
    context: schemathesis.HookContext, path_parameters: Any
) -> st.SearchStrategy[Any]:
    """The generated ids, or alice's: reads, downloads and events find something to answer."""
    if not isinstance(path_parameters, dict):  # none, or a negative case's
        return st.just(path_parameters)
    theirs = {name: ALICES[name] for name in path_parameters if name in ALICES}
    return st.sampled_from([path_parameters, path_parameters | theirs])


@schema.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """The generated body, or one that can succeed: a valid file for the upload's format, a job
    spec naming alice's model and dataset."""
    if not isinstance(body, dict):
        return st.just(body)
    upload_format = body.get("format")
    if "file" in body and isinstance(upload_format, str) and upload_format in VALID_FILES:
        return st.sampled_from([body, body | {"file": VALID_FILES[upload_format]}])
    if "model_id" in body and "dataset_id" in body:
        theirs = {"model_id": ALICES["model_id"], "dataset_id": ALICES["dataset_id"]}
        return st.sampled_from([body, body | theirs])
    return st.just(body)


@pytest.fixture
def deployed(monkeypatch: pytest.MonkeyPatch, db: Session) -> None:
    """A ready deployment: the broker answers and a worker beat just now (/readyz is 200).
    Hosts in generated URLs (notify_url, mlflow) resolve to a documentation address: no DNS."""
    monkeypatch.setattr(queue, "broker_ready", lambda: True)
    monkeypatch.setattr(guard, "resolve", lambda host, port: ["192.0.2.1"])
    workers.beat(db, "worker-1", "cpu")
    db.commit()


@pytest.fixture
def alices(
    monkeypatch: pytest.MonkeyPatch, db: Session, store: ArtifactStore, alice: Caller
) -> None:
    """A finished job (its event stream ends), its model, dataset and artifact."""
    job = make_job(db, alice.tenant_id, "succeeded")
    jobs.add_event(db, job.id, "state", {"state": "succeeded"})
    artifact = make_artifact(db, store, job, b"alice's pruned model")
    db.commit()
    ids = {
        "job_id": job.id,
        "model_id": job.model_id,
        "dataset_id": job.dataset_id or "",
        "artifact_id": artifact.id,
    }
    for name, resource_id in ids.items():
        monkeypatch.setitem(ALICES, name, resource_id)


@schema.parametrize()
# One app and one database transaction serve all the examples of an operation: what an upload
# creates, a later example may list, read or delete.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_operation_answers_as_declared(
    case: schemathesis.Case, app: FastAPI, alice: Caller, deployed: None, alices: None
) -> None:
    case.call_and_validate(app=app, headers=alice.headers, checks=CHECKS)
