"""Artifacts: the files a job produced."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    job_id: str
    format: str
    filename: str
    sha256: str
    size: int
    created_at: datetime
