"""/v1/webhooks/secret (read, rotate) and /v1/jobs/{id}/deliveries."""

from fastapi import APIRouter

from service.core.db import SessionsDep
from service.core.orm import Job, WebhookDelivery
from service.core.problems import found, responses
from service.tenants import repository as tenants
from service.tenants.auth import TenantDep
from service.webhooks import repository, secret
from service.webhooks.schemas import DeliveryOut, WebhookSecret

router = APIRouter(tags=["webhooks"], responses=responses(401, 404, 422))


@router.get("/v1/webhooks/secret", response_model=WebhookSecret)
def read_secret(tenant_id: TenantDep, sessions: SessionsDep) -> WebhookSecret:
    """The secret that signs this tenant's job notifications, made on first use."""
    with sessions() as session:
        return WebhookSecret(secret=secret.ensure(session, tenant_id))


@router.post("/v1/webhooks/secret/rotate", response_model=WebhookSecret)
def rotate_secret(tenant_id: TenantDep, sessions: SessionsDep) -> WebhookSecret:
    """A new secret: notifications sent from now on are signed with it alone."""
    with sessions() as session:
        return WebhookSecret(secret=secret.rotate(session, tenant_id))


@router.get("/v1/jobs/{job_id}/deliveries", response_model=list[DeliveryOut])
def list_deliveries(
    job_id: str, tenant_id: TenantDep, sessions: SessionsDep
) -> list[WebhookDelivery]:
    """The job's notifications to its `notify_url` and how each went."""
    with sessions() as session:
        job = found(tenants.owned(session, Job, tenant_id, job_id), "job", job_id)
        return list(repository.of_job(session, job.id))
