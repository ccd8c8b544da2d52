"""docs/pipelines.md's pieces against `apoptosis up`: examples/pipeline.sh as a CI step (the
build passes, and fails when the accuracy gate is missed) and examples/webhook_receiver.py
receiving the job's signed notifications."""

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.services import embedded_service, free_port, until, wait_listening

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Deployment:
    env: dict[str, str]
    inputs: Path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("pipelines")
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_quickstart.py"), str(work / "inputs")],
        check=True,
        capture_output=True,
    )
    # The receiver listens on loopback, which the SSRF guard refuses unless allowed.
    with embedded_service(work, APOPTOSIS_WEBHOOK_ALLOW='["127.0.0.1"]') as (url, key):
        path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        yield Deployment(
            {"APOPTOSIS_URL": url, "APOPTOSIS_API_KEY": key, "PATH": path}, work / "inputs"
        )


def _pipeline(deployment: Deployment, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "examples" / "pipeline.sh"), str(deployment.inputs / "model.zip"),
         str(deployment.inputs / "data.safetensors"), str(out)],
        env={**os.environ, **deployment.env, "STEPS": "3", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.slow  # whole jobs through a shell pipeline
def test_the_pipeline_prunes_and_the_receiver_verifies_its_notifications(
    deployment: Deployment, tmp_path: Path
) -> None:
    secret = subprocess.run(
        [sys.executable, "-c", "from service.cli.main import main; main()", "webhooks", "secret"],
        env={**os.environ, **deployment.env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    port = free_port()
    received = (tmp_path / "received.log").open("w")
    receiver = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "webhook_receiver.py"), str(port)],
        env={**os.environ, "APOPTOSIS_WEBHOOK_SECRET": secret},
        stdout=received,
    )
    try:
        wait_listening(port, receiver)
        done = _pipeline(
            deployment, tmp_path / "pruned", NOTIFY_URL=f"http://127.0.0.1:{port}/hook"
        )
        assert done.returncode == 0, done.stderr
        job = done.stdout.strip().splitlines()[-1]
        log = tmp_path / "received.log"
        # workers send due notifications every 2 s; 60 s leaves a loaded machine room
        until(lambda: f"job.succeeded {job}" in log.read_text(), 60, f"job.succeeded {job}")
    finally:
        receiver.terminate()
        receiver.wait()
        received.close()

    assert "MACs kept 0.4" in done.stdout or "MACs kept 0.5" in done.stdout
    assert (tmp_path / "pruned" / "model-hf.zip").stat().st_size > 10_000
    events = (tmp_path / "received.log").read_text().splitlines()
    assert [e.split()[0] for e in events if job in e][:2] == ["job.queued", "job.running"]


@pytest.mark.slow
def test_the_pipeline_fails_the_build_when_accuracy_drops_too_far(
    deployment: Deployment, tmp_path: Path
) -> None:
    done = _pipeline(deployment, tmp_path / "pruned", MAX_DROP="-1")  # no drop is small enough

    assert done.returncode == 1
    assert "accuracy" in done.stdout and not (tmp_path / "pruned").exists()
