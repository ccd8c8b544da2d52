"""Malformed multipart bodies: a 400 problem, the connection still usable, nothing left behind."""

import os
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service.factories import Caller, hf_archive
from tests.service.support import leftover_files, problem

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
