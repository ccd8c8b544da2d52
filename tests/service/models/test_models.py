"""GET /v1/models (paginated), GET and DELETE /v1/models/{id}."""

import base64
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.core.orm import Model
from tests.service.factories import Caller, make_job, make_model
from tests.service.support import newest_first, problem, walk

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("limit", [1, 3, 7, 50])
def test_pages_walk_every_model_once_newest_first(
    client: TestClient, db: Session, alice: Caller, bob: Caller, limit: int
) -> None:
    # Pairs share a timestamp, so the id must break ties for the cursor to be exact.
    models = [
        make_model(db, alice.tenant_id, name=f"m{i}", created_at=EPOCH + timedelta(seconds=i // 2))
        for i in range(7)
    ]
    make_model(db, bob.tenant_id, created_at=EPOCH + timedelta(seconds=1))
    db.expire_all()  # rows come back from the database, as in a fresh request's session

    pages = walk(client, "/v1/models", alice, limit)

    assert [id_ for page in pages for id_ in page] == newest_first(models)
    assert [len(page) for page in pages] == [min(limit, 7 - n) for n in range(0, 7, limit)]


def test_an_empty_listing_has_no_cursor(client: TestClient, alice: Caller) -> None:
    assert client.get("/v1/models", headers=alice.headers).json() == {
        "items": [],
        "next_cursor": None,
    }


DEEP_CURSOR = base64.urlsafe_b64encode(b"[" * 5_000).decode()  # nests past recursion


@pytest.mark.parametrize("cursor", ["not-a-cursor", "W10", "eyJhIjogMX0", "WzEsIDJd", DEEP_CURSOR])
def test_a_malformed_cursor_is_400(client: TestClient, alice: Caller, cursor: str) -> None:
    # "W10" is [], "eyJhIjogMX0" {"a": 1}, "WzEsIDJd" [1, 2]: JSON, but not a cursor
    response = client.get("/v1/models", params={"cursor": cursor}, headers=alice.headers)
    problem(response, 400, "invalid_cursor")


@pytest.mark.parametrize("limit", ["0", "201", "many"])
def test_a_limit_out_of_range_is_422(client: TestClient, alice: Caller, limit: str) -> None:
    response = client.get("/v1/models", params={"limit": limit}, headers=alice.headers)
    body = problem(response, 422, "invalid_request")
    assert body["errors"][0]["loc"] == ["query", "limit"]


def test_a_model_reads_back_as_uploaded(client: TestClient, db: Session, alice: Caller) -> None:
    model = make_model(db, alice.tenant_id, state="rejected")
    model.rejection_reason = "config.json is missing"
    db.flush()
    body = client.get(f"/v1/models/{model.id}", headers=alice.headers).json()
    assert body["id"] == model.id
    assert (body["state"], body["rejection_reason"]) == ("rejected", "config.json is missing")
    assert (body["sha256"], body["size"]) == (model.sha256, model.size)
    assert "blob_key" not in body and "tenant_id" not in body


def test_an_unknown_model_is_404(client: TestClient, alice: Caller) -> None:
    problem(client.get(f"/v1/models/{'f' * 32}", headers=alice.headers), 404, "model_not_found")


def test_deleting_a_model(client: TestClient, db: Session, alice: Caller) -> None:
    model = make_model(db, alice.tenant_id)
    response = client.delete(f"/v1/models/{model.id}", headers=alice.headers)
    assert response.status_code == 204
    assert response.content == b""
    db.expunge_all()  # the handler deleted the row with a session of its own
    assert db.get(Model, model.id) is None
    problem(client.get(f"/v1/models/{model.id}", headers=alice.headers), 404, "model_not_found")


def test_a_model_that_jobs_refer_to_cannot_be_deleted(
    client: TestClient, db: Session, alice: Caller
) -> None:
    job = make_job(db, alice.tenant_id, "succeeded")
    response = client.delete(f"/v1/models/{job.model_id}", headers=alice.headers)
    problem(response, 409, "model_in_use")
    db.expire_all()
    assert db.get(Model, job.model_id) is not None


def test_timestamps_say_they_are_utc(client: TestClient, db: Session, alice: Caller) -> None:
    model = make_model(db, alice.tenant_id)
    body = client.get(f"/v1/models/{model.id}", headers=alice.headers).json()
    assert body["created_at"].endswith("Z")
    stated = datetime.fromisoformat(body["created_at"])
    assert stated.utcoffset() == timedelta(0)
    assert abs(stated - model.created_at.replace(tzinfo=UTC)) < timedelta(seconds=1)
