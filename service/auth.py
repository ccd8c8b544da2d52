"""API keys: random tokens, stored as sha256, each scoping requests to one tenant."""

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import SessionsDep
from service.orm import ApiKey, Tenant
from service.problems import ProblemError

KEY_PREFIX = "apo_"


def hash_key(key: str) -> str:
    # Keys carry 256 bits of randomness: a plain digest is enough; no password stretching needed.
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_id: str, key: str | None = None) -> str:
    """Store a new key for `tenant_id` and return it (the only time it is ever visible)."""
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:10]))
    return key


def create_tenant(session: Session, name: str, key: str | None = None) -> tuple[Tenant, str]:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant, create_key(session, tenant.id, key)


def tenant_of_key(session: Session, key: str) -> str | None:
    row = session.scalar(
        select(ApiKey.tenant_id).where(
            ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
        )
    )
    return row


def current_tenant(request: Request, sessions: SessionsDep) -> str:
    """The tenant of the request's API key, looked up in the thread pool with a session of its
    own, closed at once: no connection is held while an upload streams in."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise ProblemError(401, "unauthenticated", "send 'Authorization: Bearer <api key>'")
    with sessions() as session:
        tenant_id = tenant_of_key(session, key.strip())
    if tenant_id is None:
        raise ProblemError(401, "invalid_api_key", "the API key is unknown or revoked")
    return tenant_id


TenantDep = Annotated[str, Depends(current_tenant)]
