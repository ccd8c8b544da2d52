"""API keys: random tokens, stored as sha256, each scoping requests to one tenant."""

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.core.db import SessionsDep
from service.core.orm import Tenant
from service.core.problems import ProblemError
from service.tenants import repository

KEY_PREFIX = "apo_"


def hash_key(key: str) -> str:
    # Keys carry 256 bits of randomness: a plain digest is enough; no password stretching needed.
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_id: str, key: str | None = None) -> str:
    """Store a new key for `tenant_id` and return it (the only time it is ever visible)."""
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    repository.add_key(session, tenant_id, hash_key(key), key[:10])
    return key


def create_tenant(session: Session, name: str, key: str | None = None) -> tuple[Tenant, str]:
    tenant = repository.add_tenant(session, name)
    return tenant, create_key(session, tenant.id, key)


def tenant_of_key(session: Session, key: str) -> str | None:
    """The tenant an unrevoked key belongs to."""
    return repository.tenant_of_key(session, hash_key(key))


# Declares the bearer scheme in the OpenAPI document; the problems below are ours, not its 403.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer apo_…`")


def current_tenant(
    sessions: SessionsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> str:
    """The tenant of the request's API key, looked up in the thread pool with a session of its
    own, closed at once: no connection is held while an upload streams in."""
    if credentials is None or not credentials.credentials.strip():
        raise ProblemError(401, "unauthenticated", "send 'Authorization: Bearer <api key>'")
    with sessions() as session:
        tenant_id = tenant_of_key(session, credentials.credentials.strip())
    if tenant_id is None:
        raise ProblemError(401, "invalid_api_key", "the API key is unknown or revoked")
    return tenant_id


TenantDep = Annotated[str, Depends(current_tenant)]
