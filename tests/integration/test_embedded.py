"""`apoptosis up` as a user runs it: SQLite, filesystem broker, local files, one worker."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.client import Client
from tests.integration.flow import prune_bert_to_half_the_macs
from tests.integration.services import bert_upload, embedded_service


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Client]:
    with embedded_service(tmp_path) as (url, key), Client(url, key) as client:
        yield client


def test_embedded_service_prunes_an_uploaded_bert(embedded: Client, tmp_path: Path) -> None:
    archive, data = bert_upload(tmp_path)
    prune_bert_to_half_the_macs(embedded, archive, data, tmp_path)

    # The SDK's one call: upload (formats from the files), submit, wait, download.
    result = embedded.prune(
        archive,
        data,
        target={"macs": 0.7},
        output=tmp_path / "sdk",
        schedule={"steps": 2},
        calibration={"batches": 1, "batch_size": 16},
        outputs=["safetensors"],
    )

    assert result.job.state == "succeeded" and result.model.format == "hf"
    assert result.dataset.format == "tensors"
    assert [f.name for f in result.files] == ["model-safetensors.zip"]
    assert result.files[0].stat().st_size == result.artifacts[0].size


def test_api_process_never_imports_torch() -> None:
    code = (
        "import sys, service.api.app, service.cli.main, service.client\n"
        "service.api.app.create_app()\n"
        "print(','.join(m for m in ('torch', 'worker', 'transformers') if m in sys.modules))"
    )
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "APOPTOSIS_HOME": "/tmp/apoptosis-import-check"},
    )
    assert out.stdout.strip() == ""
