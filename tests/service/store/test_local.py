"""The artifact-store contract, and the local store that is its reference implementation.

`StoreContract` holds the behaviour every store must show; test_s3.py runs it against S3.
"""

import errno
import hashlib
import os
import random
import tracemalloc
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from service.core.store import (
    ArtifactStore,
    BlobNotFound,
    InvalidKey,
    LocalStore,
    StoreFull,
    UploadTooLarge,
    store_from_url,
)

Contents = Callable[[], list[str]]

DIGEST = hashlib.sha256(b"anything").hexdigest()
INVALID_KEYS = [
    "",
    "../outside",
    "/etc/passwd",
    "sha256/../../outside",
    f"sha256/{DIGEST[:2]}/{DIGEST}/../../../outside",
    f"sha256/00/{DIGEST}",  # the folder must repeat the digest's first two characters
    f"sha256/{DIGEST[:2].upper()}/{DIGEST.upper()}",
    f"sha256/{DIGEST[:2]}/{DIGEST}\n",
    f"sha256/{DIGEST[:2]}/{DIGEST[:-1]}",
    "tmp/0123456789abcdef",
]


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    return (data[start : start + size] for start in range(0, len(data), size))


class StoreContract:
    """Subclasses provide the fixtures `store` and `contents` (every name the backend holds,
    temporary files and unfinished uploads included, so "leaves nothing behind" is checkable)."""

    def test_round_trip(self, store: ArtifactStore, contents: Contents) -> None:
        data = payload(300_001)
        blob = store.put_stream(chunked(data, 65_537))
        digest = hashlib.sha256(data).hexdigest()
        assert blob.key == f"sha256/{digest[:2]}/{digest}"
        assert (blob.sha256, blob.size) == (digest, len(data))
        assert store.exists(blob.key)
        assert store.size(blob.key) == len(data)
        with store.open(blob.key) as stream:
            assert stream.read() == data
        pieces = list(store.iter_chunks(blob.key, chunk_size=50_000))
        assert max(len(piece) for piece in pieces) <= 50_000
        assert b"".join(pieces) == data
        with store.local_path(blob.key) as path:
            assert path.read_bytes() == data
        assert contents() == [blob.key]

    @pytest.mark.parametrize(("start", "length"), [(0, 10), (5, 120_000), (299_990, None)])
    def test_a_range_of_a_blob(self, store: ArtifactStore, start: int, length: int | None) -> None:
        data = payload(300_001)
        blob = store.put_stream([data])
        pieces = list(store.iter_chunks(blob.key, 50_000, start=start, length=length))
        end = None if length is None else start + length
        assert b"".join(pieces) == data[start:end]

    def test_empty_stream(self, store: ArtifactStore) -> None:
        blob = store.put_stream([])
        assert (blob.sha256, blob.size) == (hashlib.sha256(b"").hexdigest(), 0)
        assert b"".join(store.iter_chunks(blob.key)) == b""

    def test_put_is_idempotent(self, store: ArtifactStore, contents: Contents) -> None:
        data = payload(10_000)
        first = store.put_stream(chunked(data, 3_000))
        second = store.put_stream(chunked(data, 7))
        other = store.put_stream([payload(10_000, seed=1)])
        assert first == second != other
        assert contents() == sorted([first.key, other.key])
        assert b"".join(store.iter_chunks(first.key)) == data

    def test_exactly_max_bytes_is_accepted(self, store: ArtifactStore) -> None:
        assert store.put_stream(chunked(payload(4_000), 1_000), max_bytes=4_000).size == 4_000

    def test_too_large_stops_at_the_cap_and_leaves_nothing(
        self, store: ArtifactStore, contents: Contents
    ) -> None:
        pulled = []

        def source() -> Iterator[bytes]:
            for index in range(10):
                pulled.append(index)
                yield payload(1_000, seed=index)

        with pytest.raises(UploadTooLarge) as raised:
            store.put_stream(source(), max_bytes=2_500)
        assert raised.value.max_bytes == 2_500
        assert pulled == [0, 1, 2]  # the third chunk crosses the cap; nothing more is read
        assert contents() == []

    def test_failing_source_leaves_nothing(self, store: ArtifactStore, contents: Contents) -> None:
        def source() -> Iterator[bytes]:
            yield payload(5_000)
            raise ConnectionResetError("client went away")

        with pytest.raises(ConnectionResetError):
            store.put_stream(source())
        assert contents() == []

    def test_delete(self, store: ArtifactStore, contents: Contents) -> None:
        blob = store.put_stream([b"short-lived"])
        store.delete(blob.key)
        assert not store.exists(blob.key)
        assert contents() == []

    def test_missing_blob(self, store: ArtifactStore) -> None:
        key = f"sha256/{DIGEST[:2]}/{DIGEST}"
        assert not store.exists(key)
        store.delete(key)  # deleting twice is not an error
        with pytest.raises(BlobNotFound):
            store.open(key)
        with pytest.raises(BlobNotFound):
            store.size(key)
        with pytest.raises(BlobNotFound), store.local_path(key):
            pass

    @pytest.mark.parametrize("key", INVALID_KEYS)
    def test_invalid_keys_are_refused(self, store: ArtifactStore, key: str) -> None:
        operations: list[Callable[[], object]] = [
            partial(store.open, key),
            partial(store.exists, key),
            partial(store.size, key),
            partial(store.delete, key),
            lambda: list(store.iter_chunks(key)),
            lambda: store.local_path(key).__enter__(),
        ]
        for operation in operations:
            with pytest.raises(InvalidKey):
                operation()


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalStore:
        return LocalStore(tmp_path / "store")

    @pytest.fixture
    def contents(self, store: LocalStore) -> Contents:
        def files() -> list[str]:
            return sorted(
                path.relative_to(store.root).as_posix()
                for path in store.root.rglob("*")
                if not path.is_dir()
            )

        return files

    def test_blob_is_a_file_at_its_key(self, store: LocalStore) -> None:
        blob = store.put_stream([b"weights"])
        assert (store.root / blob.key).read_bytes() == b"weights"
        with store.local_path(blob.key) as path:
            assert path == store.root / blob.key  # no copy: the worker reads the file in place

    def test_traversal_cannot_touch_files_outside_the_root(self, store: LocalStore) -> None:
        outside = store.root.parent / "outside"
        outside.write_bytes(b"precious")
        store.put_stream([b"anything"])
        for key in INVALID_KEYS:
            with pytest.raises(InvalidKey):
                store.delete(key)
        assert outside.read_bytes() == b"precious"

    def test_memory_stays_flat(self, store: LocalStore) -> None:
        mebibyte = 1 << 20

        def source() -> Iterator[bytes]:
            for seed in range(64):
                yield payload(mebibyte, seed)

        tracemalloc.start()
        try:
            blob = store.put_stream(source())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert blob.size == 64 * mebibyte
        assert peak < 4 * mebibyte  # a chunk or two in flight, never the 64 MiB stream


@pytest.mark.parametrize("url", ["{root}", "file://{root}", "file://localhost{root}"])
def test_store_from_url_local(tmp_path: Path, url: str) -> None:
    store = store_from_url(url.format(root=tmp_path))
    assert isinstance(store, LocalStore)
    assert store.root == tmp_path


@pytest.mark.parametrize(
    "url", ["file://elsewhere/data", "file:///data?mode=rw", "ftp://host/data", "gs://bucket"]
)
def test_store_from_url_refuses_what_it_cannot_honour(url: str) -> None:
    with pytest.raises(ValueError, match="store URL"):
        store_from_url(url)


def test_a_full_disk_is_store_full_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path)

    def no_space(_: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)

    with pytest.raises(StoreFull):
        store.put_stream([b"weights"])
    assert list((tmp_path / "tmp").iterdir()) == []
