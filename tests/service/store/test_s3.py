"""The S3 store against moto's S3 server on loopback: the store contract plus the multipart path."""

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
from moto.server import ThreadedMotoServer

from service.core.store import UploadTooLarge, store_from_url
from service.core.store.s3 import PART_SIZE, S3Client, S3Store
from tests.service.store.test_local import Contents, StoreContract, chunked, payload

MEBIBYTE = 1 << 20
Calls = list[tuple[str, dict[str, Any]]]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials, and no profile, config file or proxy of the developer's."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    for name in ["AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture
def client(endpoint: str, aws_environment: None) -> S3Client:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(client: S3Client) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def calls(client: S3Client) -> Calls:
    """Every S3 operation the store asks for, with its parameters, in order."""
    recorded: Calls = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        recorded.append((model.name, dict(params)))

    client.meta.events.register("provide-client-params.s3.*", record)
    return recorded


class TestS3Store(StoreContract):
    @pytest.fixture
    def store(self, bucket: str, client: S3Client, calls: Calls) -> S3Store:
        return S3Store(bucket, client=client)

    @pytest.fixture
    def contents(self, bucket: str, client: S3Client) -> Contents:
        """Objects, and multipart uploads never completed nor aborted (which S3 bills)."""

        def names() -> list[str]:
            objects = client.list_objects_v2(Bucket=bucket).get("Contents", [])
            uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            return sorted(
                [entry["Key"] for entry in objects]
                + [f"unfinished upload of {entry['Key']}" for entry in uploads]
            )

        return names

    def test_short_stream_is_put_in_one_request(self, store: S3Store, calls: Calls) -> None:
        blob = store.put_stream(chunked(payload(PART_SIZE - 1), MEBIBYTE))
        assert [name for name, params in calls] == ["PutObject"]
        assert calls[0][1]["Key"] == blob.key

    def test_long_stream_goes_up_in_parts(
        self, store: S3Store, calls: Calls, contents: Contents
    ) -> None:
        data = payload(2 * PART_SIZE + 12_345)
        blob = store.put_stream(chunked(data, MEBIBYTE))
        parts = [len(params["Body"]) for name, params in calls if name == "UploadPart"]
        assert parts == [PART_SIZE, PART_SIZE, 12_345]
        assert b"".join(store.iter_chunks(blob.key)) == data
        assert contents() == [blob.key]  # the temporary object is gone

    def test_a_range_is_fetched_as_a_range(self, store: S3Store, calls: Calls) -> None:
        """A download that resumes at byte 5 asks S3 for those bytes only."""
        data = payload(300_001)
        blob = store.put_stream([data])

        assert b"".join(store.iter_chunks(blob.key, start=5, length=1000)) == data[5:1005]
        assert b"".join(store.iter_chunks(blob.key, start=299_990)) == data[299_990:]

        ranges = [params.get("Range") for name, params in calls if name == "GetObject"]
        assert ranges == ["bytes=5-1004", "bytes=299990-"]

    def test_long_stream_already_stored_is_not_copied_again(
        self, store: S3Store, calls: Calls, contents: Contents
    ) -> None:
        data = payload(PART_SIZE + 1)
        first = store.put_stream(chunked(data, MEBIBYTE))
        copies = {"CopyObject", "UploadPartCopy"}
        assert any(name in copies for name, _ in calls)
        calls.clear()
        assert store.put_stream(chunked(data, 3 * MEBIBYTE)) == first
        assert not any(name in copies for name, _ in calls)
        assert contents() == [first.key]

    def test_too_large_after_a_part_aborts_the_upload(
        self, store: S3Store, calls: Calls, contents: Contents
    ) -> None:
        with pytest.raises(UploadTooLarge):
            store.put_stream(chunked(payload(3 * PART_SIZE), MEBIBYTE), max_bytes=2 * PART_SIZE)
        names = [name for name, _ in calls]
        assert names.count("UploadPart") == 2
        assert names[-1] == "AbortMultipartUpload"
        assert contents() == []

    def test_failing_source_mid_upload_aborts_it(
        self, store: S3Store, calls: Calls, contents: Contents
    ) -> None:
        def source() -> Iterator[bytes]:
            yield from chunked(payload(PART_SIZE + MEBIBYTE), MEBIBYTE)
            raise ConnectionResetError("client went away")

        with pytest.raises(ConnectionResetError):
            store.put_stream(source())
        assert "UploadPart" in [name for name, _ in calls]
        assert contents() == []


def test_store_from_url_s3(endpoint: str, bucket: str) -> None:
    store = store_from_url(f"s3://{bucket}?endpoint_url={endpoint}&region=eu-west-1")
    assert isinstance(store, S3Store)
    blob = store.put_stream([b"configured by URL"])
    with store.open(blob.key) as stream:
        assert stream.read() == b"configured by URL"


@pytest.mark.parametrize(
    "url", ["s3://", "s3://bucket/prefix", "s3://bucket?endpoint=http://127.0.0.1:9000"]
)
def test_store_from_url_refuses_what_it_cannot_honour(url: str) -> None:
    with pytest.raises(ValueError, match="store URL"):
        store_from_url(url)
