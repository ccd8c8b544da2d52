"""Blobs as files under one directory: the embedded (laptop) store, and a shared volume's."""

import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from service.core.store.base import (
    ArtifactStore,
    BlobNotFound,
    StoredBlob,
    StoreFull,
    StreamDigest,
    key_for,
    validate_key,
)


class LocalStore(ArtifactStore):
    """Files at `<root>/<key>`. Writes go to `<root>/tmp/` first and are renamed into place, so a
    reader sees a whole blob or none, and a crash leaves at most a temporary file that no key can
    name. `tmp/` sits under the root so the rename never crosses filesystems."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put_stream(self, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredBlob:
        spool = self.root / "tmp"
        spool.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=spool, prefix="put-")
        temporary = Path(name)
        try:
            digest = StreamDigest(max_bytes)
            with os.fdopen(handle, "wb") as file:
                for chunk in chunks:
                    digest.update(chunk)
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
            key = key_for(digest.hexdigest())
            target = self.root / key
            target.parent.mkdir(parents=True, exist_ok=True)
            # Same key, same bytes: replacing an existing blob is harmless, and atomic.
            os.replace(temporary, target)
        except BaseException as error:
            temporary.unlink(missing_ok=True)
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull() from error
            raise
        _fsync_directory(target.parent)
        return StoredBlob(key=key, sha256=digest.hexdigest(), size=digest.size)

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        yield path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself: without it a power loss can forget a blob already reported
    stored (and recorded in the database)."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
