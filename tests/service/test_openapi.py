"""The OpenAPI document tells the truth a generated client needs: the bearer scheme, the
problems each operation answers with, and the multipart bodies of the uploads."""

from typing import Any

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def document(client: TestClient) -> dict[str, Any]:
    body: dict[str, Any] = client.get("/openapi.json").json()
    return body


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in document["paths"].items()
        if path.startswith("/v1/")
        for method, operation in item.items()
    ]


def test_every_v1_operation_declares_the_bearer_scheme_and_its_401(
    document: dict[str, Any],
) -> None:
    schemes = document["components"]["securitySchemes"]
    assert [s["scheme"].lower() for s in schemes.values() if s["type"] == "http"] == ["bearer"]
    operations = _operations(document)
    assert len(operations) >= 12
    for method, path, operation in operations:
        assert operation.get("security"), (method, path)
        assert "401" in operation["responses"], (method, path)
        problem = operation["responses"]["401"]["content"]
        assert "application/problem+json" in problem, (method, path)


def test_uploads_declare_their_multipart_body(document: dict[str, Any]) -> None:
    for path in ("/v1/models", "/v1/datasets"):
        body = document["paths"][path]["post"]["requestBody"]["content"]
        schema = body["multipart/form-data"]["schema"]
        assert {"file", "format"} <= set(schema["required"])
        assert {"413", "415", "422"} <= set(document["paths"][path]["post"]["responses"])


def test_job_submission_declares_its_quota_and_broker_problems(document: dict[str, Any]) -> None:
    assert {"404", "409", "413", "422", "429", "503"} <= set(
        document["paths"]["/v1/jobs"]["post"]["responses"]
    )


def test_answers_other_than_the_default_json_are_declared(document: dict[str, Any]) -> None:
    paths = document["paths"]
    download = paths["/v1/artifacts/{artifact_id}/content"]["get"]["responses"]
    assert {"200", "206", "304", "416"} <= set(download)
    assert set(download["200"]["content"]) == {"application/octet-stream"}
    report = paths["/v1/jobs/{job_id}/report"]["get"]["responses"]["200"]["content"]
    assert {"application/json", "text/html"} <= set(report)
    replayed = paths["/v1/jobs"]["post"]["responses"]["200"]["content"]["application/json"]
    assert replayed["schema"] == {"$ref": "#/components/schemas/JobOut"}


def test_every_request_body_carries_an_example(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    missing = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                schema = media["schema"]
                if "$ref" in schema:
                    schema = schemas[schema["$ref"].rsplit("/", 1)[-1]]
                if not ("example" in media or "examples" in media or "examples" in schema):
                    missing.append(f"{method} {path}")
    assert missing == []
