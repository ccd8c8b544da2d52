"""Application-wide behaviour: unexpected errors, and what the API process imports."""

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.cli.migrate import ROOT
from service.tenants import repository
from tests.service.factories import Caller
from tests.service.support import problem, requests_counted

SECRET = "password=hunter2 at /srv/apoptosis/secrets.py"


@pytest.fixture
def failing_client(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """A client of an app whose job lookup raises, as a bug would, with sensitive text."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(repository, "owned", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_an_unexpected_error_is_a_500_problem_with_an_id_and_no_details(
    failing_client: TestClient, alice: Caller, caplog: pytest.LogCaptureFixture
) -> None:
    response = failing_client.get(f"/v1/jobs/{'1' * 32}", headers=alice.headers)

    body = problem(response, 500, "internal_error")
    assert re.fullmatch(r"[0-9a-f]{32}", body["error_id"])
    assert "hunter2" not in response.text and "secrets.py" not in response.text
    assert "Traceback" not in response.text and "RuntimeError" not in response.text
    # The id leads an operator to the logged traceback.
    [record] = [r for r in caplog.records if r.name == "apoptosis.api"]
    assert body["error_id"] in record.getMessage()
    assert record.exc_info is not None and SECRET in str(record.exc_info[1])


def test_an_unexpected_error_is_counted_as_a_500(failing_client: TestClient, alice: Caller) -> None:
    route = "/v1/jobs/{job_id}"
    before = requests_counted(failing_client, "GET", route, 500)
    failing_client.get(f"/v1/jobs/{'1' * 32}", headers=alice.headers)
    assert requests_counted(failing_client, "GET", route, 500) == before + 1


def test_the_api_and_cli_import_neither_torch_nor_the_worker() -> None:
    # A fresh interpreter: this test process may have imported torch for other tests.
    program = (
        "import sys, service.api.app, service.cli.main\n"
        "heavy = {'torch', 'torch_pruning', 'transformers', 'worker'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
