"""Blobs in an S3 bucket (AWS, MinIO): the store shared by the API and many workers."""

import itertools
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    ClientError,
    HTTPClientError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from service.core.store.base import (
    ArtifactStore,
    BlobNotFound,
    StoredBlob,
    StoreUnavailable,
    StreamDigest,
    key_for,
    validate_key,
)

# S3 wants every part but the last to be at least 5 MiB and allows 10,000 parts: 8 MiB parts
# bound memory to about one part and objects to about 78 GiB.
PART_SIZE = 8 * 1024 * 1024

# boto3 generates its clients at run time; there is no static type to name.
S3Client = Any


class S3Store(ArtifactStore):
    """Blobs at `s3://<bucket>/<key>`.

    The key is the content's sha256, known only once the stream has ended, and an upload stream
    cannot be read twice. So a stream that ends within the first part is hashed in memory and
    put straight under its key; a longer one goes up as a multipart upload to `tmp/<uuid>` while
    it is hashed, is then copied server-side to its key (unless that blob already exists) and
    the temporary object is deleted. The bytes cross the network once, readers never see a
    partial blob, and any failure aborts the upload or deletes the temporary object. A process
    killed mid-upload can still leave an incomplete upload or a `tmp/` object behind: give the
    bucket a lifecycle rule that aborts incomplete uploads and expires `tmp/` after a day.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: S3Client | None = None,
    ) -> None:
        """`region=None` leaves it to boto3 (AWS_DEFAULT_REGION, the AWS config file)."""
        self.bucket = bucket
        # Self-hosted endpoints (MinIO, tests) have no per-bucket DNS names: address by path.
        # A store that hangs costs a request seconds, not minutes: bounded waits and retries.
        config = Config(
            s3={"addressing_style": "path"} if endpoint_url else {},
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        self._client = client or boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )

    def put_stream(self, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredBlob:
        digest = StreamDigest(max_bytes)
        parts = _parts(chunks, digest)
        first = next(parts)
        with _unavailable_as_error():
            if len(first) < PART_SIZE:  # the stream ended inside the first part
                key = key_for(digest.hexdigest())
                self._client.put_object(Bucket=self.bucket, Key=key, Body=first)
            else:
                key = self._put_multipart(itertools.chain([first], parts), digest)
        return StoredBlob(key=key, sha256=digest.hexdigest(), size=digest.size)

    def open(self, key: str) -> BinaryIO:
        with self._not_found_as_error(key), _unavailable_as_error():
            body: BinaryIO = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
        return body

    def iter_chunks(
        self, key: str, chunk_size: int = 1 << 20, *, start: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        """A range is fetched as a range (`Range: bytes=…`): S3 sends only those bytes."""
        if not start and length is None:
            yield from super().iter_chunks(key, chunk_size)
            return
        if length == 0:
            return
        last = "" if length is None else str(start + length - 1)
        with self._not_found_as_error(key), _unavailable_as_error():
            answer = self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{last}"
            )
        with answer["Body"] as body:
            while chunk := body.read(chunk_size):
                yield chunk

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        """Download to a temporary file (under TMPDIR), removed when the block exits."""
        with tempfile.TemporaryDirectory(prefix="apoptosis-blob-") as directory:
            path = Path(directory) / key.rsplit("/", 1)[-1]
            with self._not_found_as_error(key), _unavailable_as_error():
                self._client.download_file(self.bucket, key, str(path))
            yield path

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except BlobNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        with _unavailable_as_error():
            self._client.delete_object(Bucket=self.bucket, Key=validate_key(key))

    def size(self, key: str) -> int:
        with self._not_found_as_error(key), _unavailable_as_error():
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        return int(head["ContentLength"])

    def _put_multipart(self, parts: Iterable[bytes], digest: StreamDigest) -> str:
        temporary = f"tmp/{uuid.uuid4().hex}"
        upload = {"Bucket": self.bucket, "Key": temporary}
        upload_id = self._client.create_multipart_upload(**upload)["UploadId"]
        try:
            uploaded = [
                {
                    "PartNumber": number,
                    "ETag": self._client.upload_part(
                        **upload, UploadId=upload_id, PartNumber=number, Body=part
                    )["ETag"],
                }
                for number, part in enumerate(parts, start=1)
            ]
            self._client.complete_multipart_upload(
                **upload, UploadId=upload_id, MultipartUpload={"Parts": uploaded}
            )
        except BaseException:
            self._client.abort_multipart_upload(**upload, UploadId=upload_id)
            raise
        try:
            key = key_for(digest.hexdigest())
            if not self.exists(key):
                # The managed copy switches to a multipart copy above 5 GB, where CopyObject stops.
                self._client.copy(upload, self.bucket, key)
        finally:
            self._client.delete_object(**upload)
        return key

    @contextmanager
    def _not_found_as_error(self, key: str) -> Iterator[None]:
        """Validate `key`, and turn S3's "no such key" (404 on HEAD) into `BlobNotFound`."""
        validate_key(key)
        try:
            yield
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                raise BlobNotFound(key) from None
            raise


@contextmanager
def _unavailable_as_error() -> Iterator[None]:
    """A store that does not answer (refused, timed out, closed, a 5xx) is `StoreUnavailable`:
    the API answers 503, a job ends `store_unavailable`, rather than an internal error."""
    try:
        yield
    except (BotoConnectionError, HTTPClientError) as error:
        raise StoreUnavailable(type(error).__name__) from error
    except ClientError as error:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status >= 500:
            raise StoreUnavailable(f"HTTP {status}") from error
        raise


def _parts(chunks: Iterable[bytes], digest: StreamDigest) -> Iterator[bytes]:
    """Regroup `chunks` into parts of at least PART_SIZE bytes (the last may be shorter, and is
    empty only for an empty stream), passing every chunk through `digest` on the way."""
    buffer = bytearray()
    emitted = False
    for chunk in chunks:
        digest.update(chunk)
        buffer += chunk
        if len(buffer) >= PART_SIZE:
            yield bytes(buffer)
            buffer.clear()
            emitted = True
    if buffer or not emitted:
        yield bytes(buffer)
