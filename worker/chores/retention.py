"""The worker's retention round: expire old artifacts (when the operator set `artifact_days`),
then delete the blobs nothing names any more. Every worker runs it; rounds that overlap are
harmless, as each deletion is claimed in the database first."""

import logging
from datetime import timedelta

from service.artifacts import repository as artifacts
from service.blobs import service as blobs
from service.core.db import get_sessionmaker
from service.core.orm import utcnow
from service.core.settings import Settings
from service.core.store import get_store

log = logging.getLogger("apoptosis.worker")


def sweep_once(settings: Settings) -> blobs.Swept:
    sessions = get_sessionmaker()
    if settings.artifact_days:
        with sessions() as session:
            expired = artifacts.expire(session, utcnow() - timedelta(days=settings.artifact_days))
            session.commit()
        if expired:
            log.info("expired %d artifacts older than %g days", expired, settings.artifact_days)
    swept = blobs.sweep(sessions, get_store(), timedelta(seconds=settings.blob_grace_seconds))
    if swept.blobs:
        log.info("deleted %d unreferenced blobs (%d bytes)", swept.blobs, swept.bytes)
    return swept
