"""Retention: blobs stay while a model, dataset or artifact names them and are deleted after.

Storing and sweeping race on one key (the same bytes uploaded again as the sweep deletes them);
the blob's row orders them. A saver stores the blob, then records it in the transaction that adds
its reference, then confirms it is still in the store; the sweep deletes the row, then the blob,
then commits. A record that meets the sweep's deletion waits for that commit, and its
confirmation then finds the blob gone and stores it again.
"""

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from service.blobs import repository
from service.core.orm import utcnow
from service.core.store import ArtifactStore, StoredBlob, store_file


@dataclass(frozen=True)
class Swept:
    blobs: int
    bytes: int


def confirm_stored(store: ArtifactStore, blob: StoredBlob, source: Path) -> None:
    """Once the reference to `blob` is committed: store it again from `source` if a sweep
    deleted it between the store and the commit."""
    if not store.exists(blob.key):
        store_file(source, store)


def sweep(sessions: sessionmaker[Session], store: ArtifactStore, grace: timedelta) -> Swept:
    """Delete every blob no row names that was last stored more than `grace` ago."""
    stored_before = utcnow() - grace
    with sessions() as session:
        keys = repository.unreferenced(session, stored_before)
    blobs = freed = 0
    for key in keys:
        with sessions() as session:
            size = repository.claim(session, key, stored_before)
            if size is None:
                continue
            store.delete(key)  # under the row's lock; a failure rolls the claim back
            session.commit()
        blobs, freed = blobs + 1, freed + size
    return Swept(blobs, freed)
