"""Malformed input is a 4xx problem, never a 500 (security issue 19).

A lone surrogate (`"\\ud800"`) is valid JSON but text that UTF-8 cannot encode: the database
driver and the response encoder fail on it. Where JSON reaches a handler (the job spec, the JSON
inside a cursor) it is refused as the client's fault. Where HTTP carries bytes (paths, queries,
headers, form parts) the surrogate's code unit arrives as UTF-8 would write it (CESU-8,
`ED A0 80`), which the server decodes or refuses. The sweep goes over every operation the OpenAPI
document declares, so a new route or field is covered the day it is added.
"""

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.api.app import create_app
from service.core.store import ArtifactStore
from tests.service.factories import (
    Caller,
    hf_archive,
    make_artifact,
    make_dataset,
    make_job,
    make_model,
)
from tests.service.support import problem

LONE = "\ud800"
LONE_BYTES = b"\xed\xa0\x80"  # its code unit as UTF-8 would write it: what bytes can carry
DOCUMENT = create_app().openapi()
Field = tuple[str | int, ...]  # where a string sits in a JSON body: keys and list indexes


def _string_fields(schema: dict[str, Any]) -> Iterator[Field]:
    """Every place a JSON document of `schema` holds a string (through refs, unions, lists)."""
    if "$ref" in schema:
        name = schema["$ref"].rpartition("/")[2]
        yield from _string_fields(DOCUMENT["components"]["schemas"][name])
    for option in schema.get("anyOf", []):
        yield from _string_fields(option)
    if schema.get("type") == "string":
        yield ()
    if "items" in schema:
        yield from ((0, *inner) for inner in _string_fields(schema["items"]))
    for name, inner_schema in schema.get("properties", {}).items():
        yield from ((name, *inner) for inner in _string_fields(inner_schema))


def _with(document: Any, field: Field, value: str) -> Any:
    """A copy of `document` holding `value` at `field`, making the dicts and lists on the way."""
    if not field:
        return value
    head, rest = field[0], field[1:]
    if isinstance(head, int):
        return [_with(None, rest, value)]
    inner = document.get(head) if isinstance(document, dict) else None
    return {**(document or {}), head: _with(inner, rest, value)}


def _cases() -> list[Any]:
    """(method, path, where, field) for every string each operation reads."""
    cases = []
    for path, operations in DOCUMENT["paths"].items():
        for method, operation in operations.items():
            places: list[tuple[str, Field]] = [
                (p["in"], (p["name"],)) for p in operation.get("parameters", [])
            ]
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                schema = content["application/json"]["schema"]
                places += [("body", field) for field in dict.fromkeys(_string_fields(schema))]
            if "multipart/form-data" in content:
                form = content["multipart/form-data"]["schema"]["properties"]
                places += [("form", (name,)) for name in form]
            cases += [
                pytest.param(
                    method.upper(),
                    path,
                    where,
                    field,
                    id=f"{method} {path} {where} " + ".".join(map(str, field)),
                )
                for where, field in places
            ]
    return cases


@pytest.fixture
def alices(db: Session, store: ArtifactStore, alice: Caller) -> dict[str, str]:
    """Alice's finished job, its inputs and an artifact: path parameters that find something."""
    model, dataset = make_model(db, alice.tenant_id), make_dataset(db, alice.tenant_id)
    job = make_job(db, alice.tenant_id, "succeeded", model=model, dataset=dataset)
    artifact = make_artifact(db, store, job, b"0123456789")
    return {
        "job_id": job.id,
        "model_id": model.id,
        "dataset_id": dataset.id,
        "artifact_id": artifact.id,
    }


def _send(
    app: FastAPI, method: str, url: str, headers: dict[bytes, bytes], content: bytes = b""
) -> httpx.Response:
    """One request with raw header bytes, answered as a server would: a 500 comes back as a
    response, not as the exception behind it."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.request(method, url, headers=headers, content=content)

    return asyncio.run(send())


def _form(parts: list[tuple[bytes, bytes, bytes | None]]) -> bytes:
    """A multipart/form-data body (boundary `b0undary`) of (name, value, filename) parts."""
    body = b""
    for name, value, filename in parts:
        disposition = b'form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        body += b"--b0undary\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + value + b"\r\n"
    return body + b"--b0undary--\r\n"


@pytest.mark.parametrize(("method", "path", "where", "field"), _cases())
def test_no_operation_answers_a_lone_surrogate_with_a_5xx(
    app: FastAPI,
    alice: Caller,
    alices: dict[str, str],
    method: str,
    path: str,
    where: str,
    field: Field,
) -> None:
    name = str(field[0])
    url = path.format(**alices)
    headers = {k.encode(): v.encode() for k, v in alice.headers.items()}
    content = b""
    if where == "path":
        url = path.format(**alices | {name: quote(LONE_BYTES)})
    elif where == "query":
        url += f"?{name}={quote(LONE_BYTES)}"
    elif where == "header":
        headers[name.encode()] = LONE_BYTES
    elif where == "body":
        spec = {"model_id": alices["model_id"], "dataset_id": alices["dataset_id"]}
        content = json.dumps(_with(spec, field, LONE)).encode()  # the surrogate as `\ud800`
        headers[b"content-type"] = b"application/json"
    else:  # a form part: the file's name, or the field's value
        upload_format = b"hf" if path == "/v1/models" else b"tensors"
        file_part = (b"file", hf_archive(b"weights"), LONE_BYTES if name == "file" else b"m.zip")
        fields = {"format": upload_format, "name": b"upload"} | (
            {name: LONE_BYTES} if name != "file" else {}
        )
        content = _form([(k.encode(), v, None) for k, v in fields.items()] + [file_part])
        headers[b"content-type"] = b"multipart/form-data; boundary=b0undary"

    response = _send(app, method, url, headers, content)

    assert response.status_code < 500, response.text


@pytest.mark.parametrize(
    "field",
    [("model_id",), ("dataset_id",), ("evaluation", "dataset_id"), ("mlflow", "experiment")],
    ids=".".join,
)
def test_a_lone_surrogate_in_the_spec_is_422_naming_where(
    client: TestClient, alice: Caller, alices: dict[str, str], field: Field
) -> None:
    spec = {"model_id": alices["model_id"], "dataset_id": alices["dataset_id"]}
    body = json.dumps(_with(spec, field, LONE)).encode()  # the surrogate as `\ud800`
    headers = alice.headers | {"Content-Type": "application/json"}

    response = client.post("/v1/jobs", content=body, headers=headers)

    errors = problem(response, 422, "invalid_request")["errors"]
    assert ["body", *field] in [error["loc"] for error in errors]


def _cursor(raw_json: bytes) -> str:
    return base64.urlsafe_b64encode(raw_json).decode().rstrip("=")


@pytest.mark.parametrize("listing", ["/v1/models", "/v1/datasets", "/v1/jobs"])
@pytest.mark.parametrize(
    "raw_json",
    [
        b'["2026-01-01T00:00:00+00:00", "\\ud800"]',  # the JSON escape
        b'["2026-01-01T00:00:00+00:00", "' + LONE_BYTES + b'"]',  # json.loads(bytes) takes it too
    ],
    ids=["escaped", "cesu-8"],
)
def test_a_cursor_holding_a_lone_surrogate_is_400(
    client: TestClient, alice: Caller, listing: str, raw_json: bytes
) -> None:
    response = client.get(listing, params={"cursor": _cursor(raw_json)}, headers=alice.headers)

    problem(response, 400, "invalid_cursor")
