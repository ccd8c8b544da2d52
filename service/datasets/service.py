"""Dataset use cases: check an upload and store it."""

from sqlalchemy.orm import Session, sessionmaker

from service.core.orm import Dataset
from service.core.problems import ProblemError
from service.core.store import ArtifactStore
from service.datasets import checks, repository
from service.uploads import service as uploads
from service.uploads.multipart import Upload


def check(upload: Upload, dataset_format: str) -> None:
    """Refuse a file that is not what its format says (422), before it is stored."""
    try:
        checks.check(upload.path, dataset_format, upload.filename)
    except checks.InvalidDataset as error:
        raise ProblemError(422, error.code, str(error)) from error


def create(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    tenant_id: str,
    received: uploads.Received,
) -> Dataset:
    """Store the upload and record the dataset."""
    return uploads.save(sessions, store, tenant_id, received, Dataset, repository.add)
