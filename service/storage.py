"""The configured artifact store, one per process."""

from functools import lru_cache
from pathlib import Path

from service.settings import get_settings
from service.store import ArtifactStore, StoredBlob, store_from_url


@lru_cache
def get_store() -> ArtifactStore:
    return store_from_url(get_settings().resolved_store_url())


def store_file(path: Path) -> StoredBlob:
    """Stream a local file into the store in 1 MiB chunks."""
    with path.open("rb") as file:
        return get_store().put_stream(iter(lambda: file.read(1 << 20), b""))
