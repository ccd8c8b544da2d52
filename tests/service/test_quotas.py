"""Per-tenant upload quotas: uploads per minute and bytes stored, each a 429 with Retry-After,
refused before the body is spooled when its declared length already tells."""

from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.orm import UploadAdmission
from service.core.settings import Settings, get_settings
from service.uploads import quota
from tests.service.datasets.test_datasets import TENSORS
from tests.service.datasets.test_datasets import upload as upload_dataset
from tests.service.factories import Caller
from tests.service.models.test_upload import WEIGHTS
from tests.service.models.test_upload import upload as upload_model
from tests.service.support import QueueRecorder, leftover_files, problem


def set_limit(monkeypatch: pytest.MonkeyPatch, name: str, value: int) -> None:
    monkeypatch.setenv(f"APOPTOSIS_{name}", str(value))
    get_settings.cache_clear()


def test_uploads_past_the_rate_get_429_until_the_minute_has_passed(
    client: TestClient,
    db: Session,
    alice: Caller,
    bob: Caller,
    queued: QueueRecorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The quota's clock stands still (moved only by the test), so Retry-After is exactly the
    wait the rate computes, however long the requests take."""
    set_limit(monkeypatch, "MAX_UPLOADS_PER_MINUTE", 3)
    clock = [datetime.now(UTC)]
    monkeypatch.setattr(quota, "utcnow", lambda: clock[0])
    for seconds_ago in (5 * 60, 50, 20):  # the first has left the minute
        _admitted(db, alice, clock[0] - timedelta(seconds=seconds_ago))
    assert upload_model(client, alice, WEIGHTS).status_code == 201  # the third in a minute

    response = upload_dataset(client, alice, TENSORS)

    body = problem(response, 429, "upload_rate_exceeded")
    assert body["limit"] == 3
    assert response.headers["retry-after"] == "10"  # when the oldest of the three leaves it
    assert upload_model(client, bob, WEIGHTS).status_code == 201  # bob has his own minute
    clock[0] += timedelta(seconds=9)
    early = upload_dataset(client, alice, TENSORS)
    problem(early, 429, "upload_rate_exceeded")
    assert early.headers["retry-after"] == "1"
    clock[0] += timedelta(seconds=1)
    assert upload_dataset(client, alice, TENSORS).status_code == 201
    assert len(queued.validations) == 2  # the models; a dataset is not validated


def test_deleting_uploads_gives_back_none_of_the_rate(
    client: TestClient, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rate counts uploads made, not the rows that remain (security issue 19, finding 10)."""
    set_limit(monkeypatch, "MAX_UPLOADS_PER_MINUTE", 3)
    for _ in range(3):
        model_id = upload_model(client, alice, WEIGHTS).json()["id"]
        assert client.delete(f"/v1/models/{model_id}", headers=alice.headers).status_code == 204

    problem(upload_model(client, alice, WEIGHTS), 429, "upload_rate_exceeded")


def test_a_refused_upload_is_not_counted_and_old_admissions_are_forgotten(
    client: TestClient, db: Session, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_limit(monkeypatch, "MAX_UPLOADS_PER_MINUTE", 1)
    _admitted(db, alice, datetime.now(UTC) - timedelta(minutes=5))
    set_limit(monkeypatch, "MAX_TENANT_BYTES", len(WEIGHTS) // 2)
    problem(upload_model(client, alice, WEIGHTS), 429, "storage_quota_exceeded")
    set_limit(monkeypatch, "MAX_TENANT_BYTES", len(WEIGHTS) + 1000)  # the multipart body fits

    assert upload_model(client, alice, WEIGHTS).status_code == 201  # the one of its minute

    db.expire_all()
    assert len(_admissions(db, alice)) == 1  # the admission five minutes old is gone


def _admitted(db: Session, caller: Caller, at: datetime) -> None:
    db.add(UploadAdmission(tenant_id=caller.tenant_id, admitted_at=at))
    db.commit()


def _admissions(db: Session, caller: Caller) -> list[UploadAdmission]:
    query = select(UploadAdmission).where(UploadAdmission.tenant_id == caller.tenant_id)
    return list(db.scalars(query))


def test_an_upload_that_would_pass_the_storage_quota_is_refused_unread(
    client: TestClient,
    db: Session,
    settings: Settings,
    alice: Caller,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_limit(monkeypatch, "MAX_TENANT_BYTES", len(WEIGHTS) + len(TENSORS) // 2)
    assert upload_model(client, alice, WEIGHTS).status_code == 201
    stored_before = leftover_files(settings)

    response = upload_dataset(client, alice, TENSORS)

    body = problem(response, 429, "storage_quota_exceeded")
    assert body["stored"] == len(WEIGHTS)
    assert int(response.headers["retry-after"]) > 0
    assert "Delete models, datasets or jobs" in body["detail"]
    assert leftover_files(settings) == stored_before  # nothing spooled, nothing stored


def test_a_chunked_upload_is_measured_once_received(
    client: TestClient,
    settings: Settings,
    alice: Caller,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a Content-Length the quota is checked on the bytes received."""
    set_limit(monkeypatch, "MAX_TENANT_BYTES", len(WEIGHTS) // 2)
    boundary = "quota-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="format"\r\n\r\nhf\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        + WEIGHTS
        + f"\r\n--{boundary}--\r\n".encode()
    )

    response = client.post(
        "/v1/models",
        headers=alice.headers | {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=iter([body]),  # an iterator: sent chunked, with no length
    )

    problem(response, 429, "storage_quota_exceeded")
    assert leftover_files(settings) == []


def test_deleting_frees_the_quota_at_once(
    client: TestClient, alice: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_limit(monkeypatch, "MAX_TENANT_BYTES", len(WEIGHTS) + 1000)
    first = upload_model(client, alice, WEIGHTS).json()["id"]
    problem(upload_model(client, alice, WEIGHTS), 429, "storage_quota_exceeded")

    client.delete(f"/v1/models/{first}", headers=alice.headers)

    assert upload_model(client, alice, WEIGHTS).status_code == 201
