"""MLflow logging against a real tracking server (`mlflow server`, SQLite, on loopback): the
run's params, metrics (per step too) and artifacts; a server that is down leaves the job's
success standing and its result saying why nothing was logged."""

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.core.settings import get_settings
from service.jobs.results import JobResult
from tests.integration.services import free_port
from tests.worker import factories

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = (folder / "server.log").open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow did not start"
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


@pytest.fixture
def loopback_allowed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("APOPTOSIS_WEBHOOK_ALLOW", '["127.0.0.1"]')
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _prune(tmp_path: Path, tracking_uri: str, run_name: str) -> JobResult:
    spec = factories.spec(
        outputs=["safetensors"],
        finetune={"epochs": 1},
        mlflow={"tracking_uri": tracking_uri, "experiment": "bert-pruning", "run_name": run_name},
    )
    return factories.run_bert_job(tmp_path, spec)


@pytest.mark.slow  # a tracking server and a whole job
def test_a_job_logs_params_metrics_report_and_model(
    tracking_server: str, loopback_allowed: None, tmp_path: Path
) -> None:
    result = _prune(tmp_path, tracking_server, "half the macs")

    logged = result.mlflow
    assert logged is not None and logged.run_id is not None, logged
    client = MlflowClient(tracking_server)
    run = client.get_run(logged.run_id)
    assert run.info.run_name == "half the macs" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "bert-pruning"
    assert run.data.params["target.macs"] == "0.5" and run.data.params["method"] == "oba"
    metrics = run.data.metrics
    assert metrics["macs_after"] <= 0.5 * metrics["macs_before"]
    assert {"before_loss", "after_pruning_loss", "after_finetune_loss"} <= set(metrics)
    steps = client.get_metric_history(run.info.run_id, "step_macs")
    assert [m.step for m in steps] == [1, 2] and steps[-1].value == metrics["macs_after"]
    assert len(client.get_metric_history(run.info.run_id, "step_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "model"} <= artifacts
    model_files = [a.path for a in client.list_artifacts(run.info.run_id, "model")]
    assert model_files == ["model/model-safetensors.zip"]


def test_a_tracking_server_that_is_down_leaves_the_job_standing(
    loopback_allowed: None, tmp_path: Path
) -> None:
    result = _prune(tmp_path, f"http://127.0.0.1:{free_port()}", "nobody listens")

    assert result.macs_after  # the pruning stands
    logged = result.mlflow
    assert logged is not None and logged.error and logged.run_id is None


def test_a_private_tracking_server_is_refused_without_the_allow_list(tmp_path: Path) -> None:
    get_settings.cache_clear()
    result = _prune(tmp_path, "http://10.0.0.1:5000", "refused")

    assert result.mlflow is not None
    assert result.mlflow.model_dump() == {
        "error": "mlflow.tracking_uri: the host '10.0.0.1' resolves to 10.0.0.1, a non-public "
        "address; the operator can allow it with APOPTOSIS_WEBHOOK_ALLOW",
        "tracking_uri": "http://10.0.0.1:5000",
    }
