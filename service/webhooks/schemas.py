"""Webhook deliveries and the tenant's signing secret, as the API shows them."""

from typing import Any

from pydantic import BaseModel, ConfigDict

from service.core.timestamps import UtcDatetime


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str  # the webhook-id header of every attempt
    event_type: str
    url: str
    state: str  # pending | delivered | failed
    attempts: int
    next_attempt_at: UtcDatetime
    last_status: int | None
    last_error: str | None
    payload: dict[str, Any]
    created_at: UtcDatetime
    delivered_at: UtcDatetime | None


class WebhookSecret(BaseModel):
    """Verify notifications with it (any Standard Webhooks library: `Webhook(secret).verify`)."""

    secret: str
