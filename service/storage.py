"""The configured artifact store, one per process."""

from functools import lru_cache

from service.settings import get_settings
from service.store import ArtifactStore, store_from_url


@lru_cache
def get_store() -> ArtifactStore:
    return store_from_url(get_settings().resolved_store_url())
