"""Dataset resources as the API shows them."""

from pydantic import BaseModel

from service.core.timestamps import UtcDatetime

DATASET_FORMATS: tuple[str, ...] = ("tensors", "jsonl", "imagefolder")


class DatasetOut(BaseModel):
    id: str
    name: str
    format: str
    sha256: str
    size: int
    created_at: UtcDatetime

    model_config = {"from_attributes": True}


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    next_cursor: str | None
