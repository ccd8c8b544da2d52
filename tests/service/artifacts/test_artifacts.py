"""A job's artifacts: listed per job, downloaded streamed with the sha256 as a strong ETag."""

import hashlib

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.core.store import ArtifactStore
from tests.service.factories import Caller, make_artifact, make_job
from tests.service.support import latin1_get, problem

CONTENT = b"PK\x03\x04" + bytes(range(256)) * 8192  # 2 MiB: more than one chunk of the stream


def test_a_jobs_artifacts_are_listed(
    client: TestClient, db: Session, store: ArtifactStore, alice: Caller
) -> None:
    job = make_job(db, alice.tenant_id, "succeeded")
    other_job = make_job(db, alice.tenant_id, "succeeded")
    artifact = make_artifact(db, store, job, CONTENT)
    make_artifact(db, store, other_job, b"another job's output")

    response = client.get(f"/v1/jobs/{job.id}/artifacts", headers=alice.headers)

    assert response.status_code == 200
    [listed] = response.json()
    assert listed["id"] == artifact.id and listed["job_id"] == job.id
    assert (listed["format"], listed["filename"]) == ("hf", "pruned.zip")
    assert (listed["sha256"], listed["size"]) == (hashlib.sha256(CONTENT).hexdigest(), len(CONTENT))
    assert "blob_key" not in listed


def test_a_job_without_artifacts_lists_none(client: TestClient, db: Session, alice: Caller) -> None:
    job = make_job(db, alice.tenant_id, "running")
    assert client.get(f"/v1/jobs/{job.id}/artifacts", headers=alice.headers).json() == []


def test_a_download_streams_the_exact_bytes_with_the_sha256_as_etag(
    client: TestClient, db: Session, store: ArtifactStore, alice: Caller
) -> None:
    artifact = make_artifact(db, store, make_job(db, alice.tenant_id, "succeeded"), CONTENT)

    response = client.get(f"/v1/artifacts/{artifact.id}/content", headers=alice.headers)

    assert response.status_code == 200
    assert response.content == CONTENT
    assert response.headers["etag"] == f'"{hashlib.sha256(CONTENT).hexdigest()}"'
    assert response.headers["content-length"] == str(len(CONTENT))
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"] == 'attachment; filename="pruned.zip"'


@pytest.mark.parametrize("listed_with", ["{etag}", '"stale", {etag}', '{etag},"other"'])
def test_a_matching_if_none_match_is_304_without_a_body(
    client: TestClient, db: Session, store: ArtifactStore, alice: Caller, listed_with: str
) -> None:
    artifact = make_artifact(db, store, make_job(db, alice.tenant_id, "succeeded"), CONTENT)
    etag = f'"{artifact.sha256}"'

    response = client.get(
        f"/v1/artifacts/{artifact.id}/content",
        headers=alice.headers | {"If-None-Match": listed_with.format(etag=etag)},
    )

    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag


@pytest.mark.parametrize("stale", ['"0000"', "{sha}"])
def test_a_different_if_none_match_downloads_again(
    client: TestClient, db: Session, store: ArtifactStore, alice: Caller, stale: str
) -> None:
    # "{sha}" is the digest without quotes: an ETag is a quoted string, so it does not match.
    artifact = make_artifact(db, store, make_job(db, alice.tenant_id, "succeeded"), CONTENT)
    response = client.get(
        f"/v1/artifacts/{artifact.id}/content",
        headers=alice.headers | {"If-None-Match": stale.format(sha=artifact.sha256)},
    )
    assert response.status_code == 200
    assert response.content == CONTENT


def test_an_unknown_artifact_is_404(client: TestClient, alice: Caller) -> None:
    response = client.get(f"/v1/artifacts/{'e' * 32}/content", headers=alice.headers)
    problem(response, 404, "artifact_not_found")


def test_head_answers_the_download_headers_without_a_body(
    client: TestClient, db: Session, store: ArtifactStore, alice: Caller
) -> None:
    artifact = make_artifact(db, store, make_job(db, alice.tenant_id, "succeeded"), CONTENT)

    response = client.head(f"/v1/artifacts/{artifact.id}/content", headers=alice.headers)

    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == str(len(CONTENT))
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["etag"] == f'"{hashlib.sha256(CONTENT).hexdigest()}"'


SIZE = len(CONTENT)


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=1048570-1048590", 1048570, 1048590),  # across a chunk boundary of the stream
        (f"bytes={SIZE - 10}-", SIZE - 10, SIZE - 1),
        ("bytes=-10", SIZE - 10, SIZE - 1),
        (f"bytes=5-{SIZE + 100}", 5, SIZE - 1),  # an end past the blob is cut to it
    ],
)
def test_a_range_is_served_as_partial_content(
    client: TestClient,
    db: Session,
    store: ArtifactStore,
    alice: Caller,
    header: str,
    first: int,
    last: int,
) -> None:
    artifact = make_artifact(db, store, make_job(db, alice.tenant_id, "succeeded"), CONTENT)

    response = client.get(
        f"/v1/artifacts/{artifact.id}/content", headers=alice.headers | {"Range": header}
    )

    assert response.status_code == 206
    assert response.content == CONTENT[first : last + 1]
    assert response.headers["content-range"] == f"bytes {first}-{last}/{SIZE}"
    assert response.headers["content-length"] == str(last - first + 1)


@pytest.mark.parametrize(
    "header",
    [
        f"bytes={SIZE}-",
        "bytes=10-5",
        "bytes=0-1,5-6",
        "items=0-1",
        "bytes=-0",
        "bytes=",
        "bytes=x-5",
        # not exactly one range: never read as the range a lenient parser would guess
        "bytes=5- 9",
        "bytes=5 -9",
        "bytes= 5-9",
        "bytes =5-9",
        "bytes=5-9,",
        "bytes=5-9;",
        "bytes=+5-9",
        "bytes=5-+9",
        "bytes=-+9",
        "bytes=0x5-9",
        "bytes=5-9-",
        "bytes=-",
        "bytes",
        "5-9",
        "bytes=0-" + "9" * 5000,  # more digits than any size (and than int() reads)
    ],
)
def test_a_range_that_is_not_exactly_one_satisfiable_range_is_416(
    client: TestClient, db: Session, store: ArtifactStore, alice: Caller, header: str
) -> None:
    artifact = make_artifact(db, store, make_job(db, alice.tenant_id, "succeeded"), CONTENT)

    response = client.get(
        f"/v1/artifacts/{artifact.id}/content", headers=alice.headers | {"Range": header}
    )

    assert response.status_code == 416, response.headers.get("content-range")  # not the bytes
    problem(response, 416, "range_not_satisfiable")
    assert response.headers["content-range"] == f"bytes */{SIZE}"
    assert "content-disposition" not in response.headers  # the body is the problem


@pytest.mark.parametrize("header", ["BYTES=5-9", " bytes=5-9 ", "bytes=5-9\t"])
def test_the_unit_is_case_insensitive_and_the_values_edges_are_not_part_of_it(
    client: TestClient, db: Session, store: ArtifactStore, alice: Caller, header: str
) -> None:
    artifact = make_artifact(db, store, make_job(db, alice.tenant_id, "succeeded"), CONTENT)

    response = client.get(
        f"/v1/artifacts/{artifact.id}/content", headers=alice.headers | {"Range": header}
    )

    assert response.status_code == 206
    assert response.content == CONTENT[5:10]


@pytest.mark.parametrize("header", ["bytes=²-", "bytes=-¹", "bytes=0³-"])
def test_a_range_of_digits_int_refuses_is_416(
    app: FastAPI, db: Session, store: ArtifactStore, alice: Caller, header: str
) -> None:
    """A header is latin-1: '²' is a digit to str.isdigit, not a number to int()."""
    artifact = make_artifact(db, store, make_job(db, alice.tenant_id, "succeeded"), CONTENT)

    response = latin1_get(
        app, f"/v1/artifacts/{artifact.id}/content", alice.headers | {"Range": header}
    )

    problem(response, 416, "range_not_satisfiable")
