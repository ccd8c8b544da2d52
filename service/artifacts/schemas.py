"""Artifacts: the files a job produced."""

from pydantic import BaseModel, ConfigDict

from service.core.timestamps import UtcDatetime


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    job_id: str
    format: str
    filename: str
    sha256: str
    size: int
    target: dict[str, float] | None = None  # a family member's target ({"macs": 0.5})
    created_at: UtcDatetime
