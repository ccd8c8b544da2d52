"""Content-addressed artifact stores: local files (embedded) or S3 (production), and the one
this process is configured with (`get_store`).

`S3Store` is imported only when an `s3://` URL asks for it, so an embedded install runs without
boto3.
"""

from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from service.core.settings import get_settings
from service.core.store.base import (
    ArtifactStore,
    BlobNotFound,
    InvalidKey,
    StoredBlob,
    StoreError,
    StoreFull,
    StoreUnavailable,
    UploadTooLarge,
)
from service.core.store.local import LocalStore

__all__ = [
    "ArtifactStore",
    "BlobNotFound",
    "InvalidKey",
    "LocalStore",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "StoredBlob",
    "UploadTooLarge",
    "get_store",
    "store_file",
    "store_from_url",
]

_S3_OPTIONS = {"endpoint_url", "region"}


def store_from_url(url: str) -> ArtifactStore:
    """The store `APOPTOSIS_STORE_URL` names: `file:///abs/path` or a plain path for local files,
    `s3://bucket?endpoint_url=http://host:9000&region=us-east-1` for S3 (credentials from the
    standard AWS environment variables). Raises ValueError, which settings validation reports."""
    parts = urlsplit(url)
    if parts.scheme == "":
        return LocalStore(Path(url))
    if parts.scheme == "file":
        if parts.netloc not in {"", "localhost"} or parts.query:
            raise ValueError(f"store URL {url!r}: use file:///absolute/path")
        return LocalStore(Path(parts.path))
    if parts.scheme == "s3":
        options = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        if not parts.netloc or parts.path not in {"", "/"} or options.keys() - _S3_OPTIONS:
            raise ValueError(
                f"store URL {url!r}: use s3://bucket with optional ?endpoint_url=…&region=…"
            )
        from service.core.store.s3 import S3Store

        return S3Store(
            parts.netloc, endpoint_url=options.get("endpoint_url"), region=options.get("region")
        )
    raise ValueError(f"store URL {url!r}: expected a path, file:// or s3://")


@lru_cache
def get_store() -> ArtifactStore:
    """The configured store, one per process."""
    return store_from_url(get_settings().resolved_store_url())


def store_file(path: Path, store: ArtifactStore | None = None) -> StoredBlob:
    """Stream a local file into `store` (default: the configured one) in 1 MiB chunks."""
    with path.open("rb") as file:
        return (store or get_store()).put_stream(iter(lambda: file.read(1 << 20), b""))
