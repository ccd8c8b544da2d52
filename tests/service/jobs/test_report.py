"""GET /v1/jobs/{id}/report: JSON, and an HTML page with before/after charts."""

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.cli.output import show_job
from tests.service.factories import Caller, make_job
from tests.service.support import problem

RESULT = {
    "macs_before": 1000,
    "macs_after": 500,
    "params_before": 200,
    "params_after": 120,
    "before": {"loss": 0.5, "accuracy": 0.9, "latency_ms": 4.0},
    "after_pruning": {"loss": 0.7, "accuracy": 0.8, "latency_ms": 2.0},
    "after_finetune": None,
    "widths": {"<script>alert(1)</script>": 8, "fc1": 16},
    "seconds": {"prune": 1.5},
    "target_met": True,
    "sparsity": None,
    "example_inputs": {"x": [1, 16]},
    "config_updates": {},
    "steps": [{"step": 1, "macs": 500, "params": 120, "loss": 0.7, "seconds_scoring": 0.2}],
    "evaluated_on": "calibration",
    "micro_batch_rows": 8,
    "exports": {},
}


def test_the_report_is_json_by_default_and_html_on_request(
    client: TestClient, db: Session, alice: Caller
) -> None:
    job = make_job(db, alice.tenant_id, "succeeded")
    job.result = RESULT
    db.flush()

    as_json = client.get(f"/v1/jobs/{job.id}/report", headers=alice.headers)
    page = client.get(f"/v1/jobs/{job.id}/report?format=html", headers=alice.headers)

    assert as_json.json()["result"]["macs_after"] == 500
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "MACs (0.50×)" in page.text and "latency_ms (0.50×)" in page.text
    assert page.text.count("<svg") == 5  # MACs, params, latency, loss, accuracy
    assert "<script>" not in page.text and "&lt;script&gt;" in page.text
    # a browser neither guesses the type nor runs or loads anything the page might smuggle in
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_an_unknown_report_format_is_422(client: TestClient, db: Session, alice: Caller) -> None:
    job = make_job(db, alice.tenant_id)
    problem(
        client.get(f"/v1/jobs/{job.id}/report?format=pdf", headers=alice.headers),
        422,
        "invalid_request",
    )


def test_a_familys_report_plots_its_trade_off(
    client: TestClient, db: Session, alice: Caller
) -> None:
    member: dict[str, object] = {
        "after_finetune": None,
        "widths": {},
        "exports": {},
        "target_met": True,
    }
    family = [
        member | {"target": {"macs": 0.75}, "macs_after": 750, "params_after": 170,
                  "after_pruning": {"loss": 0.55, "accuracy": 0.88, "latency_ms": 3.1}},
        member | {"target": {"macs": 0.5}, "macs_after": 500, "params_after": 120,
                  "after_pruning": {"loss": 0.7, "accuracy": 0.8, "latency_ms": 2.0}},
    ]  # fmt: skip
    job = make_job(db, alice.tenant_id, "succeeded")
    job.result = RESULT | {"family": family}
    db.flush()

    page = client.get(f"/v1/jobs/{job.id}/report?format=html", headers=alice.headers).text

    assert "The family: size against quality and speed" in page
    assert "<td>macs 0.75</td><td>0.75</td><td>0.85</td><td>0.55</td><td>0.88</td>" in page
    assert page.count("<svg") == 5 + 3  # loss, accuracy and latency across the family


CANDIDATES = [
    {"normalisation": "max", "schedule": "exponential", "widths": {"fc1": 16}, "macs": 500,
     "params": 120, "loss_after_pruning": 0.9, "loss_after_recovery": 0.47, "chosen": False},
    {"normalisation": "lamp", "schedule": "linear", "widths": {"fc1": 12}, "macs": 480,
     "params": 110, "loss_after_pruning": 1.1, "loss_after_recovery": 0.41, "chosen": True,
     "why": "lowest held-out loss after 256 rows of recovery: 0.41 (lamp + linear) against "
            "0.47 (max + exponential)"},
]  # fmt: skip


def test_a_searchs_report_lists_its_candidates_and_why_one_won(
    client: TestClient, db: Session, alice: Caller
) -> None:
    job = make_job(db, alice.tenant_id, "succeeded")
    job.result = RESULT | {"candidates": CANDIDATES}
    plain = make_job(db, alice.tenant_id, "succeeded")
    plain.result = RESULT
    db.flush()

    as_json = client.get(f"/v1/jobs/{job.id}/report", headers=alice.headers).json()
    page = client.get(f"/v1/jobs/{job.id}/report?format=html", headers=alice.headers).text
    plain_json = client.get(f"/v1/jobs/{plain.id}/report", headers=alice.headers).json()
    plain_page = client.get(f"/v1/jobs/{plain.id}/report?format=html", headers=alice.headers)

    assert as_json["result"]["candidates"] == CANDIDATES  # no `why` where there is none
    assert "candidates" not in plain_json["result"]
    assert (
        "<tr><td>lamp + linear</td><td>0.4800</td><td>0.5500</td><td>1.1</td><td>0.41</td>"
        "<td>chosen</td></tr>" in page
    )
    assert "<td>max + exponential</td><td>0.5000</td>" in page
    assert "<p>lowest held-out loss after 256 rows of recovery: 0.41 (lamp + linear)" in page
    assert "<td>lamp + linear</td><td>fc1 12</td>" in page
    assert "Candidates" not in plain_page.text


MISSED = {
    "normalisation": "max", "schedule": "linear",
    "missed": "a macs target of 0.5 was missed: the model keeps 0.5100 of its macs",
}  # fmt: skip


def test_a_candidate_that_missed_the_target_is_shown_without_numbers(
    client: TestClient,
    db: Session,
    alice: Caller,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the table's cells on one line each, as wide as read
    job = make_job(db, alice.tenant_id, "succeeded")
    job.result = RESULT | {"candidates": [*CANDIDATES, MISSED]}
    db.flush()

    page = client.get(f"/v1/jobs/{job.id}/report?format=html", headers=alice.headers).text
    show_job(
        {"id": "j1", "state": "succeeded", "spec": {"target": {"macs": 0.5}}, "result": job.result},
        as_json=False,
    )
    shown = capsys.readouterr().out

    assert (
        "<tr><td>max + linear</td><td>—</td><td>—</td><td>—</td><td>—</td>"
        "<td>missed the target</td></tr>" in page
    )
    assert "<p>max + linear: a macs target of 0.5 was missed" in page
    assert "missed the target" in shown


def test_jobs_show_prints_a_searchs_candidates(capsys: pytest.CaptureFixture[str]) -> None:
    job = {"id": "j1", "state": "succeeded", "spec": {"target": {"macs": 0.5}}}

    show_job(job | {"result": RESULT | {"candidates": CANDIDATES}}, as_json=False)
    shown = capsys.readouterr().out
    show_job(job | {"result": RESULT}, as_json=False)
    plain = capsys.readouterr().out

    assert "lamp + linear" in shown and "max + exponential" in shown
    assert "chosen: lowest held-out loss after 256 rows of recovery: 0.41" in shown
    assert "candidates" not in plain and "chosen" not in plain
