"""Model use cases: check an upload, store it and queue its validation."""

import logging

from sqlalchemy.orm import Session, sessionmaker

from service.core import archives, queue
from service.core.orm import Model
from service.core.problems import ProblemError
from service.core.settings import get_settings
from service.core.store import ArtifactStore
from service.models import repository
from service.uploads import service as uploads
from service.uploads.multipart import Upload

log = logging.getLogger("apoptosis.api")


def check(upload: Upload, model_format: str) -> None:
    """Refuse an unsafe format or a hostile or broken archive now (422); the worker loads the
    rest when it validates the model."""
    trusted = get_settings().trusted_mode
    if model_format == "torch_pickle" and not trusted:
        raise ProblemError(
            422,
            "unsafe_format",
            "torch_pickle uploads run code when loaded; the operator has not "
            "enabled trusted mode. Upload a Hugging Face directory (format hf).",
        )
    if model_format == "hf":
        try:
            archives.check_hf_upload(upload.path, trusted=trusted)
        except archives.UnsafeArchive as error:
            raise ProblemError(422, error.code, str(error)) from error


def create(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    tenant_id: str,
    received: uploads.Received,
) -> Model:
    """Store the upload, record the model (validating), and queue its validation. A broker
    that cannot take the message now does not fail the upload (it is stored, and a retry
    would store it twice): the workers' reaper sends validations left waiting again."""
    model = uploads.save(sessions, store, tenant_id, received, Model, repository.add)
    try:
        queue.enqueue_validation(model.id)
    except Exception:  # any transport failure; the model stays validating until it is sent
        log.warning("model %s: its validation could not be queued; the reaper sends it", model.id)
    return model
