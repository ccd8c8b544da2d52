"""Malformed and hostile multipart bodies: a 4xx problem, the connection still usable, nothing
left behind, and no more of the body read than the part that crossed a limit."""

import os
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.uploads.multipart import MAX_FIELDS, MAX_FIELDS_BYTES
from tests.service.factories import Caller, hf_archive
from tests.service.streamed import Pulled, post
from tests.service.support import Response, leftover_files, problem

BOUNDARY = "b0undary"
ARCHIVE = hf_archive(b"\0" * 64)


def body(head: bytes, boundary: str = BOUNDARY) -> bytes:
    """A form with `format=hf` and one file part whose header block is `head`."""
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="format"\r\n\r\nhf\r\n'.encode()
        + f"--{boundary}\r\n".encode()
        + head
        + b"\r\n\r\n"
        + ARCHIVE
        + f"\r\n--{boundary}--\r\n".encode()
    )


FILE_PART = b'Content-Disposition: form-data; name="file"; filename="m.zip"'
MALFORMED: dict[str, tuple[bytes, str]] = {
    "a header line without a colon": (b'Content-Disposition form-data; name="file"', BOUNDARY),
    "a header name with invalid characters": (
        b'Content(Disposition): form-data; name="file"; filename="m.zip"',
        BOUNDARY,
    ),
    "a filename over 8 KB": (
        b'Content-Disposition: form-data; name="file"; filename="' + b"a" * 9000 + b'"',
        BOUNDARY,
    ),
    "a part name that is not UTF-8": (
        b'Content-Disposition: form-data; name="\xff\xfe"; filename="m.zip"',
        BOUNDARY,
    ),
    "a boundary over 256 characters": (FILE_PART, "x" * 300),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_multipart_body_is_a_400_and_leaves_nothing(
    client: TestClient, alice: Caller, settings: Settings, case: str
) -> None:
    head, boundary = MALFORMED[case]

    response = client.post(
        "/v1/models",
        content=body(head, boundary),
        headers=alice.headers | {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )

    problem(response, 400, "malformed_upload")
    assert leftover_files(settings) == []
    assert client.get("/v1/models", headers=alice.headers).status_code == 200


def test_spool_files_of_uploads_cut_short_are_swept_at_start(
    app: FastAPI, settings: Settings
) -> None:
    spool = settings.home / "tmp"
    spool.mkdir(parents=True, exist_ok=True)
    abandoned, live = spool / "upload-abandoned", spool / "upload-live"
    abandoned.write_bytes(b"half an upload")
    live.write_bytes(b"arriving")
    an_hour_ago = time.time() - 3600
    os.utime(abandoned, (an_hour_ago, an_hour_ago))

    with TestClient(app):  # the API starts
        pass

    assert not abandoned.exists()
    assert live.exists()  # written to just now: another process's upload in flight


def field(name: str, value: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
    return head.encode() + value + b"\r\n"


def upload_chunked(app: FastAPI, alice: Caller, *fields: bytes) -> tuple[Response, Pulled]:
    """POST /v1/models a form of `fields` and then the file, chunked, one part a chunk."""
    file_part = f"--{BOUNDARY}\r\n".encode() + FILE_PART + b"\r\n\r\n" + ARCHIVE
    end = f"\r\n--{BOUNDARY}--\r\n".encode()
    headers = alice.headers | {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    return post(app, "/v1/models", headers, [*fields, file_part + end])


def test_thousands_of_fields_are_refused_at_the_first_past_the_cap(
    app: FastAPI, alice: Caller, settings: Settings
) -> None:
    notes = [field(f"note{number}", b"x" * 1024) for number in range(3000)]

    response, pulled = upload_chunked(app, alice, field("format", b"hf"), *notes)

    body = problem(response, 413, "too_many_fields")
    assert str(MAX_FIELDS) in body["detail"]
    assert pulled.messages == MAX_FIELDS + 1  # read no further than the part past the cap
    assert leftover_files(settings) == []


def test_fields_are_capped_in_all_not_only_one_by_one(
    app: FastAPI, alice: Caller, settings: Settings
) -> None:
    # Six notes, each far below the cap: with 'format', the fourth takes them past it.
    notes = [field(f"note{number}", b"x" * (MAX_FIELDS_BYTES // 4)) for number in range(6)]

    response, pulled = upload_chunked(app, alice, field("format", b"hf"), *notes)

    problem(response, 413, "field_too_large")
    assert pulled.messages == 1 + 4  # read no further than the fourth note
    assert leftover_files(settings) == []


def test_a_form_within_the_field_caps_is_accepted(app: FastAPI, alice: Caller) -> None:
    extras = [field(f"extra{number}", b"") for number in range(MAX_FIELDS - 2)]

    response, _ = upload_chunked(
        app, alice, field("format", b"hf"), field("name", b"n" * 200), *extras
    )

    assert response.status_code == 201, response.text
