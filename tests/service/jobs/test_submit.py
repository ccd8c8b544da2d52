"""POST /v1/jobs: validation, the commit-then-enqueue order, and Idempotency-Key."""

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import flag_modified

from service.core import queue
from service.core.orm import Job, JobEvent, Model
from service.core.settings import get_settings
from service.jobs import repository
from service.jobs.states import JobState
from tests.service.factories import Caller, make_dataset, make_job, make_model
from tests.service.support import QueueRecorder, problem


@pytest.fixture
def spec(db: Session, alice: Caller) -> dict[str, Any]:
    model = make_model(db, alice.tenant_id)
    dataset = make_dataset(db, alice.tenant_id)
    return {"model_id": model.id, "dataset_id": dataset.id, "target": {"macs": 0.5}}


def job_count(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(Job)) or 0


def test_a_job_is_committed_then_enqueued(
    client: TestClient, db: Session, queued: QueueRecorder, alice: Caller, spec: dict[str, Any]
) -> None:
    response = client.post("/v1/jobs", json=spec, headers=alice.headers)

    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/jobs/{body['id']}"
    assert (body["state"], body["attempt"], body["model_id"]) == ("queued", 0, spec["model_id"])
    assert body["spec"]["method"] == "oba" and body["spec"]["outputs"] == ["hf"]  # defaults
    job = db.get(Job, body["id"])
    assert job is not None and job.tenant_id == alice.tenant_id
    events = db.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).all()
    assert [(e.kind, e.data) for e in events] == [("state", {"state": "queued"})]
    # The worker that receives the id must find the row: it was committed before the send.
    assert [(e.resource_id, e.queue, e.committed, e.row_state) for e in queued.jobs] == [
        (job.id, "cpu", True, "queued")
    ]


def test_jobs_go_to_the_configured_queue(
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    queued: QueueRecorder,
    alice: Caller,
    spec: dict[str, Any],
) -> None:
    from service.core.settings import get_settings

    monkeypatch.setenv("APOPTOSIS_JOB_QUEUE", "gpu")
    get_settings.cache_clear()
    assert client.post("/v1/jobs", json=spec, headers=alice.headers).status_code == 202
    assert [e.queue for e in queued.jobs] == ["gpu"]


@pytest.mark.parametrize("state", ["validating", "rejected"])
def test_a_model_that_is_not_ready_is_409_and_nothing_is_enqueued(
    client: TestClient,
    db: Session,
    queued: QueueRecorder,
    alice: Caller,
    spec: dict[str, Any],
    state: str,
) -> None:
    model = make_model(db, alice.tenant_id, state=state, name=state)
    response = client.post("/v1/jobs", json=spec | {"model_id": model.id}, headers=alice.headers)
    body = problem(response, 409, "model_not_ready")
    assert body["model_state"] == state
    assert job_count(db) == 0
    assert queued.jobs == []


@pytest.mark.parametrize(("field", "code"), [("model_id", "model"), ("dataset_id", "dataset")])
def test_unknown_inputs_are_404(
    client: TestClient,
    db: Session,
    queued: QueueRecorder,
    alice: Caller,
    spec: dict[str, Any],
    field: str,
    code: str,
) -> None:
    response = client.post("/v1/jobs", json=spec | {field: "0" * 32}, headers=alice.headers)
    problem(response, 404, f"{code}_not_found")
    assert job_count(db) == 0
    assert queued.jobs == []


@pytest.mark.parametrize(
    "change",
    [
        {"target": {"macs": 0.5, "params": 0.5}},
        {"target": {}},
        {"target": {"macs": 1.5}},
        {"target": {"macs": 0}},
        {"target": {"sparsity": 0.5}},  # with the default granularity, channel
        {"granularity": "unstructured", "target": {"macs": 0.5}},
        {"granularity": "block"},
        {"method": "l1"},
        {"schedule": {"steps": 0}},
        {"calibration": {"batches": 8, "batch_size": 0}},
        {"outputs": []},
        {"outputs": ["pickle"]},
        {"surprise": True},
        {"model_id": None},
        {"outputs": ["hf"] * 25},
        {"preprocess": {"std": [0.0]}},
        {"preprocess": {"mean": [float("nan")]}},
        {"preprocess": {"mean": [float("inf")]}},
        {"finetune": {"epochs": 1, "lr": float("nan")}},
    ],
)
def test_an_invalid_spec_is_422(
    client: TestClient,
    db: Session,
    queued: QueueRecorder,
    alice: Caller,
    spec: dict[str, Any],
    change: dict[str, Any],
) -> None:
    # json.dumps writes NaN and Infinity as JavaScript does; the API's parser reads them
    body_json = json.dumps(spec | change)
    headers = alice.headers | {"Content-Type": "application/json"}
    response = client.post("/v1/jobs", content=body_json, headers=headers)
    body = problem(response, 422, "invalid_request")
    assert body["errors"] and all(error["loc"][0] == "body" for error in body["errors"])
    assert job_count(db) == 0
    assert queued.jobs == []


@pytest.mark.parametrize(
    ("change", "limit"),
    [
        (
            {"schedule": {"steps": 500}, "calibration": {"batches": 10_000, "batch_size": 4096}},
            "rows scored",
        ),
        (
            {"finetune": {"epochs": 100}, "calibration": {"batches": 100, "batch_size": 512}},
            "rows fine-tuned",
        ),
        (  # each candidate of a search is scored: 8 × 250,000 is past the limit, one is not
            {
                "schedule": {"steps": 10},
                "calibration": {"batches": 1_000, "batch_size": 26},
                "search": {"candidates": 8},
                "evaluation": {"fraction": 0.2},
            },
            "× search.candidates is 2,080,000",
        ),
        (  # and with recovery "finetune" each is fine-tuned: 8 × 1,000,000
            {
                "finetune": {"epochs": 10},
                "calibration": {"batches": 1_000, "batch_size": 100},
                "schedule": {"steps": 1},
                "search": {"candidates": 8, "recovery": "finetune"},
                "evaluation": {"fraction": 0.2},
            },
            "× search.candidates is 8,000,000",
        ),
    ],
)
def test_a_spec_asking_for_too_much_work_is_422_naming_the_limit(
    client: TestClient,
    db: Session,
    alice: Caller,
    spec: dict[str, Any],
    change: dict[str, Any],
    limit: str,
) -> None:
    response = client.post("/v1/jobs", json=spec | change, headers=alice.headers)
    body = problem(response, 422, "invalid_request")
    assert limit in json.dumps(body["errors"], ensure_ascii=False)
    assert job_count(db) == 0


@pytest.mark.parametrize(
    "target", [{"macs": 0.5}, {"params": 0.5}, {"sparsity": 0.7}], ids=["macs", "params", "0.7"]
)
def test_a_2_4_job_asks_for_the_half_it_zeroes(
    client: TestClient, db: Session, alice: Caller, spec: dict[str, Any], target: dict[str, float]
) -> None:
    """2:4 zeroes half of each four weights: it changes no MACs or params as counted, and it
    can never reach a sparsity above 0.5. Refused at submit, not failed after pruning."""
    change = {"granularity": "2:4", "target": target}

    response = client.post("/v1/jobs", json=spec | change, headers=alice.headers)

    body = problem(response, 422, "invalid_request")
    assert "sparsity 0.5 or less" in json.dumps(body["errors"])
    assert job_count(db) == 0


def test_a_repeated_output_is_one_export(
    client: TestClient, alice: Caller, spec: dict[str, Any]
) -> None:
    response = client.post(
        "/v1/jobs", json=spec | {"outputs": ["hf", "onnx", "hf", "onnx"]}, headers=alice.headers
    )
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["outputs"] == ["hf", "onnx"]


@pytest.mark.parametrize(
    "change",
    [
        {"granularity": "unstructured", "target": {"sparsity": 0.5}},
        {"granularity": "2:4", "target": {"sparsity": 0.5}},
        {"granularity": "channel", "target": {"params": 0.3}, "method": "magnitude"},
        {"finetune": {"epochs": 1, "lr": 0.001}, "loss": "distill"},
    ],
)
def test_valid_specs_are_accepted(
    client: TestClient, alice: Caller, spec: dict[str, Any], change: dict[str, Any]
) -> None:
    response = client.post("/v1/jobs", json=spec | change, headers=alice.headers)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("targets", [{"": None}, True, "macs", []])
def test_targets_that_are_not_a_list_are_422_not_500(
    client: TestClient, alice: Caller, spec: dict[str, Any], targets: Any
) -> None:
    """Found by the fuzz test: the rule that makes `target` the last of `targets` indexed
    whatever came."""
    body = {k: v for k, v in spec.items() if k != "target"} | {"targets": targets}
    response = client.post("/v1/jobs", json=body, headers=alice.headers)
    problem(response, 422, "invalid_request")


def test_a_request_that_is_not_json_is_422(client: TestClient, alice: Caller) -> None:
    response = client.post("/v1/jobs", content=b"model_id=x", headers=alice.headers)
    problem(response, 422, "invalid_request")


def test_the_same_idempotency_key_and_spec_return_the_first_job(
    client: TestClient, db: Session, queued: QueueRecorder, alice: Caller, spec: dict[str, Any]
) -> None:
    headers = alice.headers | {"Idempotency-Key": "retry-1"}
    first = client.post("/v1/jobs", json=spec, headers=headers)
    # The same spec with its defaults spelled out is the same job.
    again = client.post("/v1/jobs", json=spec | {"method": "oba"}, headers=headers)

    assert first.status_code == 202, first.text
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert job_count(db) == 1
    # Still queued, so the retry sends it again (the first send may have failed); the worker's
    # claim makes the duplicate delivery a no-op.
    assert [e.resource_id for e in queued.jobs] == [first.json()["id"]] * 2


def test_a_retry_matches_a_job_stored_before_specs_carried_their_version(
    client: TestClient, db: Session, alice: Caller, spec: dict[str, Any]
) -> None:
    headers = alice.headers | {"Idempotency-Key": "retry-1"}
    first = client.post("/v1/jobs", json=spec, headers=headers)
    job = db.get(Job, first.json()["id"])
    assert job is not None and job.spec.pop("spec_version") == 1
    flag_modified(job, "spec")
    db.commit()  # as an earlier release stored it

    again = client.post("/v1/jobs", json=spec, headers=headers)

    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]


def test_the_same_idempotency_key_with_another_spec_is_409(
    client: TestClient, db: Session, queued: QueueRecorder, alice: Caller, spec: dict[str, Any]
) -> None:
    headers = alice.headers | {"Idempotency-Key": "retry-1"}
    first = client.post("/v1/jobs", json=spec, headers=headers)
    other = client.post("/v1/jobs", json=spec | {"method": "taylor"}, headers=headers)

    body = problem(other, 409, "idempotency_key_reused")
    assert body["job_id"] == first.json()["id"]
    assert job_count(db) == 1
    assert len(queued.jobs) == 1


def test_idempotency_keys_are_per_tenant(
    client: TestClient,
    db: Session,
    queued: QueueRecorder,
    alice: Caller,
    bob: Caller,
    spec: dict[str, Any],
) -> None:
    bobs = {
        "model_id": make_model(db, bob.tenant_id).id,
        "dataset_id": make_dataset(db, bob.tenant_id).id,
    }
    first = client.post("/v1/jobs", json=spec, headers=alice.headers | {"Idempotency-Key": "k"})
    second = client.post(
        "/v1/jobs", json=spec | bobs, headers=bob.headers | {"Idempotency-Key": "k"}
    )
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["id"] != second.json()["id"]
    assert len(queued.jobs) == 2


def test_an_overlong_idempotency_key_is_422(
    client: TestClient, alice: Caller, spec: dict[str, Any]
) -> None:
    headers = alice.headers | {"Idempotency-Key": "k" * 201}
    problem(client.post("/v1/jobs", json=spec, headers=headers), 422, "invalid_request")


def test_a_submit_the_broker_cannot_take_is_503_with_its_job_and_a_retry_sends_it(
    client: TestClient,
    db: Session,
    monkeypatch: pytest.MonkeyPatch,
    queued: QueueRecorder,
    alice: Caller,
    spec: dict[str, Any],
) -> None:
    """The job is committed before the send: the 503 names it, and a retry with the same
    Idempotency-Key returns that job (no second one) and sends it."""

    def broker_down(job_id: str, queue_name: str) -> None:
        raise ConnectionError("broker unreachable")

    headers = alice.headers | {"Idempotency-Key": "retry-after-outage"}
    with monkeypatch.context() as patch:
        patch.setattr(queue, "enqueue_job", broker_down)
        refused = client.post("/v1/jobs", json=spec, headers=headers)

    body = problem(refused, 503, "broker_unavailable")
    saved = db.get(Job, body["job_id"])
    assert saved is not None and saved.state == JobState.QUEUED
    assert saved.tenant_id == alice.tenant_id and queued.jobs == []

    retry = client.post("/v1/jobs", json=spec, headers=headers)

    assert retry.status_code == 200, retry.text
    assert retry.json()["id"] == body["job_id"]
    assert job_count(db) == 1
    assert [e.resource_id for e in queued.jobs] == [body["job_id"]]


def test_a_concurrent_request_with_the_same_key_returns_the_winners_job(
    client: TestClient,
    db: Session,
    monkeypatch: pytest.MonkeyPatch,
    queued: QueueRecorder,
    alice: Caller,
    spec: dict[str, Any],
) -> None:
    headers = alice.headers | {"Idempotency-Key": "raced"}
    winner = client.post("/v1/jobs", json=spec, headers=headers).json()["id"]
    lookup = repository.by_idempotency_key
    calls = 0

    def misses_once(session: Session, tenant_id: str, key: str) -> Job | None:
        # The loser looked before the winner committed: it finds nothing, then hits the index.
        nonlocal calls
        calls += 1
        return None if calls == 1 else lookup(session, tenant_id, key)

    monkeypatch.setattr(repository, "by_idempotency_key", misses_once)
    loser = client.post("/v1/jobs", json=spec, headers=headers)

    assert loser.status_code == 200, loser.text
    assert loser.json()["id"] == winner
    assert job_count(db) == 1
    assert [e.resource_id for e in queued.jobs] == [winner]


def test_an_empty_idempotency_key_is_not_a_key(
    client: TestClient, queued: QueueRecorder, alice: Caller, spec: dict[str, Any]
) -> None:
    headers = alice.headers | {"Idempotency-Key": ""}
    first = client.post("/v1/jobs", json=spec, headers=headers)
    second = client.post("/v1/jobs", json=spec | {"method": "taylor"}, headers=headers)
    # Ignoring an empty key and refusing it are both fine; treating it as a key is not.
    assert (first.status_code, second.status_code) in {(202, 202), (422, 422)}, second.text


def test_a_pickle_output_needs_trusted_mode(
    client: TestClient, queued: QueueRecorder, alice: Caller, spec: dict[str, Any]
) -> None:
    response = client.post(
        "/v1/jobs", json=spec | {"outputs": ["torch_pickle"]}, headers=alice.headers
    )

    problem(response, 422, "unsafe_format")
    assert queued.jobs == []


def test_a_params_target_below_the_reachable_value_is_422(
    client: TestClient, db: Session, queued: QueueRecorder, alice: Caller, spec: dict[str, Any]
) -> None:
    model = db.get(Model, spec["model_id"])
    assert model is not None
    model.summary = {"reachable_params": {"global": 0.3, "uniform": 0.7}}
    db.flush()
    params = spec | {"target": {"params": 0.5}}

    body = problem(
        client.post("/v1/jobs", json=params, headers=alice.headers), 422, "target_unreachable"
    )
    assert body["reachable"] == 0.7 and body["metric"] == "params"
    assert queued.jobs == []
    accepted = client.post(
        "/v1/jobs", json=params | {"outputs": ["safetensors"]}, headers=alice.headers
    )
    assert accepted.status_code == 202, accepted.text


def test_a_tenant_at_its_active_job_limit_gets_429_with_retry_after(
    client: TestClient,
    db: Session,
    queued: QueueRecorder,
    alice: Caller,
    bob: Caller,
    spec: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APOPTOSIS_MAX_ACTIVE_JOBS", "2")
    get_settings.cache_clear()
    make_job(db, alice.tenant_id, JobState.QUEUED)
    make_job(db, alice.tenant_id, JobState.RUNNING)
    make_job(db, alice.tenant_id, JobState.SUCCEEDED)  # ended jobs do not count

    response = client.post("/v1/jobs", json=spec, headers=alice.headers)

    body = problem(response, 429, "too_many_jobs")
    assert body["limit"] == 2
    assert response.headers["retry-after"] == "30"  # docs/reliability.md, Limits
    assert queued.jobs == []
    # another tenant is not held back by alice's jobs
    bobs = {
        "model_id": make_model(db, bob.tenant_id).id,
        "dataset_id": make_dataset(db, bob.tenant_id).id,
    }
    assert client.post("/v1/jobs", json=spec | bobs, headers=bob.headers).status_code == 202


def test_a_json_body_over_the_cap_is_413_before_it_is_parsed(
    client: TestClient, db: Session, alice: Caller, spec: dict[str, Any]
) -> None:
    huge = json.dumps(spec | {"outputs": ["hf"] * 300_000}).encode()  # 2 MiB
    headers = alice.headers | {"Content-Type": "application/json"}

    declared = client.post("/v1/jobs", content=huge, headers=headers)
    streamed = client.post(  # no Content-Length: chunked, counted as it arrives
        "/v1/jobs",
        content=iter([huge[i : i + 65536] for i in range(0, len(huge), 65536)]),
        headers=headers,
    )

    problem(declared, 413, "body_too_large")
    problem(streamed, 413, "body_too_large")
    assert job_count(db) == 0


SEARCH = {"search": {"candidates": 2}}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({}, "set evaluation.fraction (e.g. 0.2) or evaluation.dataset_id"),
        (
            {"target": {"latency_ms": 5.0}, "evaluation": {"fraction": 0.2}},
            "not built for a latency_ms target yet",
        ),
        (
            {
                "granularity": "unstructured",
                "target": {"sparsity": 0.5},
                "evaluation": {"fraction": 0.2},
            },
            "needs channel or layer granularity (unstructured is not built yet)",
        ),
        (
            {"search": {"candidates": 2, "recovery": "finetune"}, "evaluation": {"fraction": 0.2}},
            "gives each candidate the job's fine-tune: set finetune with at least one epoch",
        ),
        (
            {
                "search": {"candidates": 2, "recovery": "finetune"},
                "finetune": {"epochs": 0},
                "evaluation": {"fraction": 0.2},
            },
            "set finetune with at least one epoch",
        ),
        (
            {"search": {"candidates": 1, "recovery": "finetune"}, "finetune": {"epochs": 1}},
            "fine-tunes each of several candidates: set search.candidates (2 to 8)",
        ),
    ],
    ids=[
        "no held-out rows",
        "latency",
        "unstructured",
        "finetune recovery without finetune",
        "finetune recovery without epochs",
        "finetune recovery of one candidate",
    ],
)
def test_a_search_it_cannot_judge_or_has_not_built_is_422_in_one_line(
    client: TestClient,
    db: Session,
    alice: Caller,
    spec: dict[str, Any],
    change: dict[str, Any],
    says: str,
) -> None:
    body = spec | SEARCH | change
    if "targets" in change:
        del body["target"]

    response = client.post("/v1/jobs", json=body, headers=alice.headers)

    (error,) = problem(response, 422, "invalid_request")["errors"]
    assert says in error["msg"] and "\n" not in error["msg"]
    assert job_count(db) == 0


@pytest.mark.parametrize(
    "search",
    [
        {"candidates": 0},
        {"candidates": 9},
        {"recovery_rows": 0},
        {"recovery_rows": 9000},
        {"rows": 5},
    ],
)
def test_a_search_out_of_bounds_is_422(
    client: TestClient, alice: Caller, spec: dict[str, Any], search: dict[str, int]
) -> None:
    change = {"search": search, "evaluation": {"fraction": 0.2}}
    problem(
        client.post("/v1/jobs", json=spec | change, headers=alice.headers), 422, "invalid_request"
    )


@pytest.mark.parametrize(
    ("search", "evaluation"),
    [
        ({"candidates": 8, "recovery_rows": 512}, "fraction"),
        ({"candidates": 2}, "dataset"),
        ({"candidates": 3, "recovery": "finetune"}, "fraction"),
        ({"candidates": 1}, None),
    ],
)
def test_a_search_with_held_out_rows_is_accepted(
    client: TestClient,
    db: Session,
    alice: Caller,
    spec: dict[str, Any],
    search: dict[str, Any],
    evaluation: str | None,
) -> None:
    held_out = {
        "fraction": {"fraction": 0.2},
        "dataset": {"dataset_id": make_dataset(db, alice.tenant_id).id},
        None: None,
    }[evaluation]
    body = spec | {"search": search, "evaluation": held_out}
    if search.get("recovery") == "finetune":  # each candidate gets the job's fine-tune
        body["finetune"] = {"epochs": 1}

    response = client.post("/v1/jobs", json=body, headers=alice.headers)

    assert response.status_code == 202, response.text
    assert response.json()["spec"]["search"] == {"recovery": "short", "recovery_rows": 256} | search


def test_a_spec_without_a_search_tries_one_candidate(
    client: TestClient, alice: Caller, spec: dict[str, Any]
) -> None:
    response = client.post("/v1/jobs", json=spec, headers=alice.headers)
    assert response.json()["spec"]["search"] == {
        "candidates": 1,
        "recovery": "short",
        "recovery_rows": 256,
    }
