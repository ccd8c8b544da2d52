"""The artifact-store contract: content-addressed blobs (uploads, pruned models, reports).

Keys are derived from content (`sha256/<first 2 hex>/<sha256 hex>`), so storing the same bytes
twice is a no-op, a key names one immutable blob forever, and the sha256 doubles as an ETag.
Implementations stream with flat memory: a multi-GB model never sits in RAM.
"""

import hashlib
import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

# The folder must repeat the digest's first two characters: the back-reference makes the pattern
# itself refuse any key that content addressing could not have produced.
_KEY = re.compile(r"sha256/([0-9a-f]{2})/\1[0-9a-f]{62}")


class StoreError(Exception):
    """Base of the failures a store reports; callers map them to problems or job errors."""


class StoreFull(StoreError):
    """The store has no room left (ENOSPC, EDQUOT); nothing partial was left behind."""

    code = "store_full"

    def __init__(self) -> None:
        super().__init__("the artifact store is full; the operator must free or add space")


class StoreUnavailable(StoreError):
    """The store does not answer (connection refused, timed out, a 5xx); retry later."""

    code = "store_unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(f"the artifact store does not answer ({reason}); try again shortly")


class UploadTooLarge(StoreError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"the stream exceeds the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


class InvalidKey(StoreError):
    """A key that is not `sha256/<2 hex>/<64 hex>`: refused before it reaches a path or bucket."""

    def __init__(self, key: str) -> None:
        super().__init__(f"not a content key: {key!r}")
        self.key = key


class BlobNotFound(StoreError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no blob stored under {key!r}")
        self.key = key


@dataclass(frozen=True)
class StoredBlob:
    key: str
    sha256: str
    size: int


def key_for(sha256: str) -> str:
    return validate_key(f"sha256/{sha256[:2]}/{sha256}")


def validate_key(key: str) -> str:
    """Return `key` if it is a content key; anything else (`..`, absolute paths, temporary
    names) could escape the store's root or reach blobs that are still being written."""
    if _KEY.fullmatch(key) is None:
        raise InvalidKey(key)
    return key


class StreamDigest:
    """The running sha256 and size of a stream, enforcing `max_bytes` as the bytes arrive so that
    an oversized upload stops at the first chunk past the cap, not after it has been stored."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise UploadTooLarge(self.max_bytes)
        self._hash.update(chunk)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class ArtifactStore(Protocol):
    """What the API and the worker need from a blob store. `iter_chunks` is written once here in
    terms of `open`; stores inherit it by subclassing."""

    def put_stream(self, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredBlob:
        """Store the concatenated chunks under their content key. Raises `UploadTooLarge` as
        soon as more than `max_bytes` have arrived; on any failure nothing is left behind."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A readable stream of the blob; the caller closes it. Raises `BlobNotFound`."""
        ...

    def local_path(self, key: str) -> AbstractContextManager[Path]:
        """A real file holding the blob for the duration of the `with` block (libraries such as
        torch and safetensors want paths). It may be the stored blob itself: never write to it."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the blob; deleting a missing blob is not an error (deletes are retried)."""
        ...

    def size(self, key: str) -> int:
        """The blob's size in bytes. Raises `BlobNotFound`."""
        ...

    def iter_chunks(
        self, key: str, chunk_size: int = 1 << 20, *, start: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        """The blob's bytes from `start`, `length` of them (all by default), in chunks."""
        with self.open(key) as stream:
            if start and stream.seekable():
                stream.seek(start)
            else:  # a network stream: read past what comes before the range
                skip = start
                while skip and (chunk := stream.read(min(chunk_size, skip))):
                    skip -= len(chunk)
            left = length
            while (left is None or left > 0) and (
                chunk := stream.read(chunk_size if left is None else min(chunk_size, left))
            ):
                if left is not None:
                    left -= len(chunk)
                yield chunk
