"""The reaper's recovery paths and the validation summary the API relies on, end to end in one
process: the real API (its queue replaced by a recorder) and the worker's lifecycle on one
migrated SQLite database and local store. A worker killed mid-job is a lease nobody renews (the
heartbeat's time moved back), a lost broker message is a send that failed; the reaper's sends are
recorded and delivered by calling the tasks they name. No sleeps, no Celery eager mode."""

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core import queue
from service.core.broker import RUN_JOB, VALIDATE_MODEL
from service.core.db import get_sessionmaker
from service.core.orm import Job, Model
from service.core.settings import get_settings
from service.jobs import repository as jobs
from service.tenants.auth import create_key
from tests.worker import factories
from worker.runtime import lifecycle


@dataclass
class Api:
    """A client of the API with the tenant's key, and the ids its queue was asked to send."""

    client: TestClient
    headers: dict[str, str]
    jobs_sent: list[str] = field(default_factory=list)
    models_sent: list[str] = field(default_factory=list)

    def upload_bert(self, root: Path) -> str:
        archive = factories.zip_folder(factories.bert_folder(root), root / "bert.zip")
        response = self.client.post(
            "/v1/models",
            headers=self.headers,
            data={"format": "hf", "name": "bert"},
            files={"file": ("bert.zip", archive.read_bytes(), "application/zip")},
        )
        assert response.status_code == 201, response.text
        model_id: str = response.json()["id"]
        return model_id

    def model(self, model_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/models/{model_id}", headers=self.headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def upload_dataset(self, root: Path) -> str:
        data = factories.tensors_file(root / "calibration.safetensors")
        response = self.client.post(
            "/v1/datasets",
            headers=self.headers,
            data={"format": "tensors", "name": "calibration"},
            files={"file": (data.name, data.read_bytes(), "application/octet-stream")},
        )
        assert response.status_code == 201, response.text
        dataset_id: str = response.json()["id"]
        return dataset_id

    def submit(self, spec: dict[str, Any]) -> Any:
        return self.client.post("/v1/jobs", json=spec, headers=self.headers)


@pytest.fixture
def api(tenant: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    with get_sessionmaker()() as session:
        key = create_key(session, tenant)
        session.commit()
    with TestClient(create_app(), base_url="http://127.0.0.1") as client:
        recorder = Api(client, {"Authorization": f"Bearer {key}"})
        monkeypatch.setattr(
            queue, "enqueue_job", lambda job_id, _: recorder.jobs_sent.append(job_id)
        )
        monkeypatch.setattr(queue, "enqueue_validation", recorder.models_sent.append)
        yield recorder


@dataclass(frozen=True)
class Sent:
    task: str
    args: list[str]
    queue: str


def reaper_round(monkeypatch: pytest.MonkeyPatch) -> list[Sent]:
    """One round of the worker's reaper (`reap_once`), its sends recorded instead of brokered."""
    # Imported here: the Celery app reads the settings when first imported, so under this test's
    # home (the `tenant` fixture's), not the working directory.
    from worker.runtime.celery_app import app, reap_once

    sent: list[Sent] = []

    def record(task: str, *, args: list[str], queue: str) -> None:
        sent.append(Sent(task, args, queue))

    monkeypatch.setattr(app, "send_task", record)
    reap_once()
    return sent


def deliver(sent: list[Sent]) -> None:
    """Run each sent task's body in this process, as a worker that received it would."""
    from worker.runtime import tasks

    for message in sent:
        tasks.app.tasks[message.task](*message.args)


def ready_model_and_dataset(api: Api, root: Path) -> tuple[str, str]:
    model_id = api.upload_bert(root)
    assert api.models_sent == [model_id]
    lifecycle.validate_model(model_id)
    assert api.model(model_id)["state"] == "ready"
    return model_id, api.upload_dataset(root)


def job_spec(model_id: str, dataset_id: str, **overrides: Any) -> dict[str, Any]:
    spec = factories.spec(model_id=model_id, dataset_id=dataset_id, **overrides)
    return spec.model_dump(mode="json")


def claimed_by_a_worker_that_dies(job_id: str, worker: str) -> None:
    """The job claimed (attempt + 1), then its lease left to go stale: the heartbeat's time is
    moved back past `stale_after_seconds`, as if the worker had been killed that long ago."""
    stale = timedelta(seconds=2 * get_settings().stale_after_seconds)
    with get_sessionmaker()() as session:
        assert jobs.claim(session, job_id, worker)
        session.get_one(Job, job_id).heartbeat_at = datetime.now(UTC) - stale
        session.commit()


def stored_job(job_id: str) -> Job:
    with get_sessionmaker()() as session:
        return session.get_one(Job, job_id)


def test_a_job_whose_worker_dies_on_every_attempt_fails_as_worker_lost(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With APOPTOSIS_JOB_MAX_ATTEMPTS=2, the first stale lease returns the job to the queue
    (sent again); the second fails it as `worker_lost`, and it is sent no more."""
    monkeypatch.setenv("APOPTOSIS_JOB_MAX_ATTEMPTS", "2")
    get_settings.cache_clear()
    model_id, dataset_id = ready_model_and_dataset(api, tmp_path)
    submitted = api.submit(job_spec(model_id, dataset_id))
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]

    claimed_by_a_worker_that_dies(job_id, "killed:1")
    first = reaper_round(monkeypatch)

    requeued = stored_job(job_id)
    assert (requeued.state, requeued.attempt, requeued.lease_owner) == ("queued", 1, None)
    assert first == [Sent(RUN_JOB, [job_id], get_settings().job_queue)]

    claimed_by_a_worker_that_dies(job_id, "killed:2")
    second = reaper_round(monkeypatch)

    failed = stored_job(job_id)
    assert (failed.state, failed.attempt, failed.max_attempts) == ("failed", 2, 2)
    assert failed.error == {
        "code": "worker_lost",
        "message": "the worker stopped responding 2 times",
    }
    assert failed.finished_at is not None and failed.result is None
    assert second == []
    assert reaper_round(monkeypatch) == []  # a failed job is terminal: no later round revives it
    assert api.client.get(f"/v1/jobs/{job_id}", headers=api.headers).json()["state"] == "failed"


def test_a_cancelled_job_whose_worker_died_is_ended_cancelled_by_the_reaper(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel asked while the job ran leaves it `cancelling` for its worker to see; the worker
    died, so the reaper ends it `cancelled` (not queued again, nor failed as `worker_lost`
    though its one attempt is spent). A cancelling job whose worker still beats is left alone."""
    monkeypatch.setenv("APOPTOSIS_JOB_MAX_ATTEMPTS", "1")
    get_settings.cache_clear()
    model_id, dataset_id = ready_model_and_dataset(api, tmp_path)
    orphaned, alive = (api.submit(job_spec(model_id, dataset_id)).json()["id"] for _ in "ab")
    claimed_by_a_worker_that_dies(orphaned, "killed:1")
    with get_sessionmaker()() as session:
        assert jobs.claim(session, alive, "alive:2")
        session.commit()
    for job_id in (orphaned, alive):
        cancel = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers)
        assert cancel.status_code == 202 and cancel.json()["state"] == "cancelling", cancel.text

    sent = reaper_round(monkeypatch)

    cancelled = stored_job(orphaned)
    assert cancelled.state == "cancelled" and cancelled.error is None
    assert cancelled.finished_at is not None
    assert stored_job(alive).state == "cancelling"  # its worker ends it at its next step
    assert sent == []


def test_a_model_uploaded_while_the_broker_is_down_is_validated_by_the_reaper(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload is stored and answered 201 though its validation could not be sent. The reaper
    leaves it while a validation could still be under way, then sends it again; delivered, the
    model reaches `ready` with its summary, and is not sent again."""

    def broker_down(_: str) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(queue, "enqueue_validation", broker_down)
    model_id = api.upload_bert(tmp_path)
    assert api.model(model_id)["state"] == "validating"

    assert reaper_round(monkeypatch) == []  # uploaded just now: a validation may be running
    grace = lifecycle.VALIDATION_GRACE * timedelta(seconds=get_settings().stale_after_seconds)
    with get_sessionmaker()() as session:
        session.get_one(Model, model_id).created_at = datetime.now(UTC) - 2 * grace
        session.commit()
    sent = reaper_round(monkeypatch)

    assert sent == [Sent(VALIDATE_MODEL, [model_id], "cpu")]
    deliver(sent)
    model = api.model(model_id)
    assert model["state"] == "ready", model["rejection_reason"]
    assert model["summary"]["params"] > 0
    assert reaper_round(monkeypatch) == []


def test_the_reachable_params_validation_records_are_what_a_submit_is_refused_below(
    api: Api, tmp_path: Path
) -> None:
    """Validation measures the least fraction of params channel pruning reaches; a job asking
    for less is answered 422 `target_unreachable` naming that fraction, and one asking for
    exactly that is accepted."""
    model_id, dataset_id = ready_model_and_dataset(api, tmp_path)
    summary = api.model(model_id)["summary"]
    reachable = summary.get("reachable_params", {})
    assert set(reachable) == {"global", "uniform"}, summary
    floor = reachable["uniform"]  # the hf output keeps uniform widths
    assert 0 < floor < 1, reachable

    below = api.submit(job_spec(model_id, dataset_id, target={"params": floor * 0.9}))

    assert below.status_code == 422, below.text
    problem = below.json()
    assert (problem["code"], problem["metric"], problem["reachable"]) == (
        "target_unreachable",
        "params",
        floor,
    )
    assert api.jobs_sent == []
    at_floor = api.submit(job_spec(model_id, dataset_id, target={"params": floor}))
    assert at_floor.status_code == 202, at_floor.text
    assert api.jobs_sent == [at_floor.json()["id"]]
