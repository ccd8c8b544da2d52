"""The tenant's webhook signing secret (Standard Webhooks' `whsec_` + base64 of 24 bytes)."""

import base64
import secrets

from sqlalchemy.orm import Session

from service.webhooks import repository


def ensure(session: Session, tenant_id: str) -> str:
    """The tenant's secret, made (and committed) if it has none; two first calls agree."""
    current = repository.webhook_secret(session, tenant_id)
    if current is not None:
        return current
    repository.set_webhook_secret(session, tenant_id, _new(), first=True)
    session.commit()
    made = repository.webhook_secret(session, tenant_id)
    assert made is not None
    return made


def rotate(session: Session, tenant_id: str) -> str:
    """A new secret: notifications sent from now on are signed with it alone."""
    secret = _new()
    repository.set_webhook_secret(session, tenant_id, secret, first=False)
    session.commit()
    return secret


def _new() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
