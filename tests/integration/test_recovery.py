"""Cancelling a running job, and a worker killed mid-job (SIGKILL) recovered by the reaper."""

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.client import Client
from service.core.db import make_engine
from service.core.orm import Artifact, Job
from tests.integration.services import apoptosis, bert_upload, free_port, stop, wait_healthy


@dataclass
class Deployment:
    client: Client
    env: dict[str, str]
    work: Path
    workers: list[subprocess.Popen[bytes]]

    def start_worker(self) -> subprocess.Popen[bytes]:
        name = f"w{len(self.workers)}@%h"
        worker = apoptosis(
            "worker",
            "--queues",
            "cpu",
            "--name",
            name,
            env=self.env,
            log=self.work / f"worker{len(self.workers)}.log",
        )
        self.workers.append(worker)
        return worker

    def job_row(self, job_id: str) -> tuple[Job, int]:
        engine = make_engine(f"sqlite:///{self.work / 'home' / 'apoptosis.db'}")
        with Session(engine) as session:
            job = session.get(Job, job_id)
            artifacts = session.scalar(select(func.count()).where(Artifact.job_id == job_id))
        engine.dispose()
        assert job is not None
        return job, int(artifacts or 0)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    env = {
        "APOPTOSIS_HOME": str(tmp_path / "home"),
        "APOPTOSIS_HEARTBEAT_SECONDS": "0.5",
        "APOPTOSIS_STALE_AFTER_SECONDS": "3",
    }
    assert apoptosis("migrate", env=env, log=tmp_path / "migrate.log").wait(60) == 0
    port = free_port()
    api = apoptosis("api", "--port", str(port), env=env, log=tmp_path / "api.log")
    deployment = Deployment(Client(f"http://127.0.0.1:{port}", ""), env, tmp_path, [])
    try:
        wait_healthy(f"http://127.0.0.1:{port}", api, tmp_path / "api.log")
        from service.tenants.auth import create_tenant

        engine = make_engine(f"sqlite:///{tmp_path / 'home' / 'apoptosis.db'}")
        with Session(engine) as session:
            _, key = create_tenant(session, "recovery")
            session.commit()
        engine.dispose()
        deployment.client = Client(f"http://127.0.0.1:{port}", key)
        deployment.start_worker()
        yield deployment
    finally:
        deployment.client.close()
        for worker in deployment.workers:
            stop(worker)
        stop(api)


def _slow_job(deployment: Deployment) -> str:
    """A job that takes many seconds: a wider BERT, many re-scored steps."""
    archive, data = bert_upload(deployment.work, hidden=96, layers=3, intermediate=384)
    client = deployment.client
    model = client.wait_for_model(client.upload_model(archive, "hf").id)
    assert model.state == "ready", model.rejection_reason
    dataset = client.upload_dataset(data, "tensors")
    return client.submit_job(
        {
            "model_id": model.id,
            "dataset_id": dataset.id,
            "method": "oba_full",
            "target": {"macs": 0.5},
            "schedule": {"steps": 30},
            "calibration": {"batches": 2, "batch_size": 32},
        }
    ).id


def _wait_for_pruning(client: Client, job_id: str) -> None:
    for kind, data in client.events(job_id):
        if kind == "progress" and data.get("stage") == "pruning":
            return
    raise AssertionError(f"job ended before pruning started: {client.job(job_id)}")


def test_cancelling_a_running_job_ends_cancelled(deployment: Deployment) -> None:
    job_id = _slow_job(deployment)
    _wait_for_pruning(deployment.client, job_id)

    assert deployment.client.cancel(job_id).state == "cancelling"
    final = deployment.client.wait(job_id)

    assert final.state == "cancelled"
    assert deployment.job_row(job_id)[1] == 0  # no artifacts


def test_a_killed_worker_leads_to_exactly_one_completion(deployment: Deployment) -> None:
    job_id = _slow_job(deployment)
    _wait_for_pruning(deployment.client, job_id)

    os.killpg(deployment.workers[0].pid, signal.SIGKILL)
    deployment.workers[0].wait()
    deployment.start_worker()
    final = deployment.client.wait(job_id)

    job, artifacts = deployment.job_row(job_id)
    assert final.state == "succeeded", final.error
    assert job.attempt == 2
    assert artifacts == 1
    assert len(deployment.client.artifacts(job_id)) == 1
