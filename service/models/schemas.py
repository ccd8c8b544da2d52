"""Model resources as the API shows them."""

from typing import Any, Literal

from pydantic import BaseModel

from service.core.timestamps import UtcDatetime

ModelFormat = Literal["hf", "torch_pickle"]
MODEL_FORMATS: tuple[str, ...] = ("hf", "torch_pickle")


class ModelOut(BaseModel):
    id: str
    name: str
    format: str
    state: str  # validating | ready | rejected
    sha256: str
    size: int
    summary: dict[str, Any]  # params, macs, inputs, layers once ready
    rejection_reason: str | None
    created_at: UtcDatetime

    model_config = {"from_attributes": True}


class ModelPage(BaseModel):
    items: list[ModelOut]
    next_cursor: str | None
