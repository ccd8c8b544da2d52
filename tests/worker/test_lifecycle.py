"""Model validation and the job lifecycle against a migrated SQLite database and a local store
(no queue, no Celery)."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from service.core.db import get_sessionmaker
from service.core.orm import Artifact, Blob, Job, Model, WorkerHeartbeat
from service.core.settings import get_settings
from service.core.store import get_store
from service.workers import repository as workers
from tests.worker import factories
from tests.worker.stored import stored_bert, stored_job, stored_model
from worker.chores import retention
from worker.pipeline import steps
from worker.runtime import lifecycle


def test_validation_records_params_and_macs(tenant: str, tmp_path: Path) -> None:
    model_id = stored_model(
        tenant, factories.zip_folder(factories.bert_folder(tmp_path), tmp_path / "b.zip")
    )

    lifecycle.validate_model(model_id)

    with get_sessionmaker()() as session:
        model = session.get(Model, model_id)
        assert model is not None and model.state == "ready", model and model.rejection_reason
        assert model.summary["params"] > 0 and model.summary["macs"] > 0
        assert model.summary["architecture"] == "BertForSequenceClassification"


def test_a_class_outside_transformers_is_rejected_with_a_reason(
    tenant: str, tmp_path: Path
) -> None:
    folder = factories.bert_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": ["EvilModel"]}))
    model_id = stored_model(tenant, factories.zip_folder(folder, tmp_path / "evil.zip"))

    lifecycle.validate_model(model_id)

    with get_sessionmaker()() as session:
        model = session.get(Model, model_id)
        assert model is not None and model.state == "rejected"
        assert (model.rejection_reason or "").startswith("unknown_architecture")


@pytest.mark.slow  # over 5 s: whole jobs with every export
def test_a_job_runs_to_success_once_and_publishes_its_artifacts(
    tenant: str, tmp_path: Path
) -> None:
    model_id = stored_model(
        tenant, factories.zip_folder(factories.bert_folder(tmp_path), tmp_path / "b.zip")
    )
    lifecycle.validate_model(model_id)
    spec = factories.spec(outputs=["hf", "onnx"]).model_dump(mode="json")
    job_id = stored_job(tenant, model_id, tmp_path, spec)

    lifecycle.run_job(job_id)
    lifecycle.run_job(job_id)  # a duplicate delivery: the claim makes it a no-op

    with get_sessionmaker()() as session:
        finished = session.get(Job, job_id)
        assert finished is not None and finished.state == "succeeded", finished and finished.error
        assert finished.attempt == 1
        formats = sorted(session.scalars(select(Artifact.format).where(Artifact.job_id == job_id)))
        assert formats == ["hf", "onnx"]
        assert (
            finished.result is not None
            and finished.result["exports"]["onnx"]["max_abs_diff"] <= 1e-4
        )
        assert finished.result["seconds"]["store"] > 0  # putting the artifacts, timed too


def test_a_stored_spec_the_worker_does_not_know_fails_the_job_as_invalid(
    tenant: str, tmp_path: Path
) -> None:
    """The worker validates the stored spec with the API's model: a spec written by another
    version (here, a newer spec_version) fails the job with `invalid_job`, and runs nothing."""
    model_id = stored_bert(tenant, tmp_path)
    stored = factories.spec().model_dump(mode="json") | {"spec_version": 2}
    job_id = stored_job(tenant, model_id, tmp_path, stored)

    lifecycle.run_job(job_id)

    with get_sessionmaker()() as session:
        failed = session.get(Job, job_id)
        assert failed is not None and failed.state == "failed"
        assert failed.error is not None and failed.error["code"] == "invalid_job"
        assert "spec_version" in failed.error["message"]
        assert failed.result is None


def test_the_reaper_sends_again_a_queued_job_whose_message_was_lost(
    tenant: str, tmp_path: Path
) -> None:
    """A broker that restarted empty (Redis keeps nothing on disk) lost the message of a queued
    job: the reaper sends it again, once per period, and leaves a freshly sent job alone."""
    model_id = stored_bert(tenant, tmp_path)
    spec = factories.spec().model_dump(mode="json")
    lost = stored_job(tenant, model_id, tmp_path, spec)
    (tmp_path / "fresh").mkdir()
    fresh = stored_job(tenant, model_id, tmp_path / "fresh", spec)
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    with get_sessionmaker()() as session:
        for job_id, sent in ((lost, long_ago), (fresh, datetime.now(UTC))):
            job = session.get(Job, job_id)
            assert job is not None
            job.sent_at = sent
        session.commit()

    first = lifecycle.reap(get_settings())
    second = lifecycle.reap(get_settings())

    assert first == ([lost], [])  # the model, uploaded just now, may still be validating
    assert second == ([], [])  # sent just now: not again until the period has passed


def test_the_reaper_forgets_workers_silent_for_a_day(tenant: str) -> None:
    """A SIGKILLed worker never deletes its heartbeat row; the reaper drops it after a day."""
    with get_sessionmaker()() as session:
        workers.beat(session, "killed:1", "cpu")
        workers.beat(session, "alive:2", "cpu")
        session.get_one(WorkerHeartbeat, "killed:1").beat_at = datetime.now(UTC) - timedelta(days=2)
        session.commit()

    lifecycle.reap(get_settings())

    with get_sessionmaker()() as session:
        assert list(session.scalars(select(WorkerHeartbeat.name))) == ["alive:2"]


def test_a_job_past_the_time_limit_fails_as_time_limit(
    tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_id = stored_bert(tenant, tmp_path)
    job_id = stored_job(tenant, model_id, tmp_path, factories.spec().model_dump(mode="json"))
    monkeypatch.setenv("APOPTOSIS_JOB_SOFT_TIME_LIMIT", "0")  # every step is past it
    get_settings.cache_clear()

    lifecycle.run_job(job_id)

    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == "failed"
        assert job.error is not None and job.error["code"] == "time_limit"
        assert list(session.scalars(select(Artifact).where(Artifact.job_id == job_id))) == []


def test_artifacts_are_recorded_as_blobs_and_swept_once_expired(
    tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker records each artifact's blob with the artifact; with `artifact_days` set, the
    retention round forgets old artifacts and deletes their blobs; the job stays."""
    model_id = stored_bert(tenant, tmp_path)
    lifecycle.validate_model(model_id)
    spec = factories.spec(outputs=["safetensors"]).model_dump(mode="json")
    job_id = stored_job(tenant, model_id, tmp_path, spec)
    lifecycle.run_job(job_id)
    with get_sessionmaker()() as session:
        (artifact,) = session.scalars(select(Artifact).where(Artifact.job_id == job_id))
        assert session.get(Blob, artifact.blob_key) is not None
        job = session.get_one(Job, job_id)
        job.finished_at = datetime.now(UTC) - timedelta(days=3)
        session.commit()
    monkeypatch.setenv("APOPTOSIS_ARTIFACT_DAYS", "2")
    monkeypatch.setenv("APOPTOSIS_BLOB_GRACE_SECONDS", "0")
    get_settings.cache_clear()

    swept = retention.sweep_once(get_settings())

    assert (swept.blobs, swept.bytes) == (1, artifact.size)
    assert not get_store().exists(artifact.blob_key)
    with get_sessionmaker()() as session:
        assert session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []
        assert session.get_one(Job, job_id).state == "succeeded"  # the job itself stays


def test_a_model_too_big_for_the_workers_memory_fails_at_once_and_the_worker_goes_on(
    tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_id = stored_bert(tenant, tmp_path)
    lifecycle.validate_model(model_id)
    spec = factories.spec(outputs=["safetensors"]).model_dump(mode="json")
    monkeypatch.setenv("APOPTOSIS_WORKER_MEMORY_BYTES", "100000")
    get_settings.cache_clear()
    too_big = stored_job(tenant, model_id, tmp_path, spec)

    lifecycle.run_job(too_big)

    monkeypatch.delenv("APOPTOSIS_WORKER_MEMORY_BYTES")
    get_settings.cache_clear()
    fits = stored_job(tenant, model_id, tmp_path, spec)
    lifecycle.run_job(fits)  # the same process takes the next job
    with get_sessionmaker()() as session:
        failed, succeeded = session.get_one(Job, too_big), session.get_one(Job, fits)
    assert failed.state == "failed" and failed.error is not None
    assert failed.error["code"] == "out_of_memory"
    assert "needs at least" in failed.error["message"]
    assert "the worker has 97.7 KiB" in failed.error["message"]  # 100,000 bytes, readable
    assert succeeded.state == "succeeded", succeeded.error


def test_an_allocation_failing_mid_job_fails_it_as_out_of_memory(
    tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_id = stored_bert(tenant, tmp_path)
    lifecycle.validate_model(model_id)
    job_id = stored_job(tenant, model_id, tmp_path, factories.spec().model_dump(mode="json"))

    def exhausted(*_: object, **__: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 …")

    monkeypatch.setattr(steps, "prune_", exhausted)

    lifecycle.run_job(job_id)

    with get_sessionmaker()() as session:
        job = session.get_one(Job, job_id)
    assert job.state == "failed" and job.error is not None
    assert job.error["code"] == "out_of_memory"
    assert "Tried to allocate 20.00 GiB" in job.error["message"]


@pytest.mark.slow  # a whole family job
def test_a_family_job_records_each_artifact_with_its_target(tenant: str, tmp_path: Path) -> None:
    model_id = stored_bert(tenant, tmp_path)
    lifecycle.validate_model(model_id)
    spec = factories.spec(targets=[{"macs": 0.8}, {"macs": 0.55}], schedule={"steps": 2})
    job_id = stored_job(tenant, model_id, tmp_path, spec.model_dump(mode="json"))

    lifecycle.run_job(job_id)

    with get_sessionmaker()() as session:
        job = session.get_one(Job, job_id)
        artifacts = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
    assert job.state == "succeeded", job.error
    assert job.result is not None and len(job.result["family"]) == 2
    assert sorted((a.filename, str(a.target)) for a in artifacts) == [
        ("model-hf.macs-0.55.zip", "{'macs': 0.55}"),
        ("model-hf.macs-0.8.zip", "{'macs': 0.8}"),
    ]
