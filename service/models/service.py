"""Model use cases: check an upload, store it and queue its validation."""

from sqlalchemy.orm import Session, sessionmaker

from service import archives, queue
from service.models import repository
from service.orm import Model
from service.problems import ProblemError
from service.settings import get_settings
from service.store import ArtifactStore
from service.uploads import service as uploads
from service.uploads.multipart import Upload


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
    """Store the upload, record the model (validating), and queue its validation."""
    model = uploads.save(sessions, store, tenant_id, received, Model, repository.add)
    queue.enqueue_validation(model.id)
    return model
