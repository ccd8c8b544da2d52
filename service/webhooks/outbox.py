"""The outbox: a job's state change writes its notification in the change's own transaction,
so a notification is never lost to a crash between the change and the send, nor sent for a
change that rolled back. Workers send them (`worker/chores/webhooks.py`)."""

from typing import Any

from sqlalchemy.orm import Session

from service.core.orm import Job, WebhookDelivery, utcnow
from service.webhooks import repository

PAYLOAD_FIELDS = ("id", "state", "model_id", "dataset_id", "attempt", "error")


def add_for_state(session: Session, job_id: str, state: str) -> None:
    """Queue a `job.<state>` notification if the job names a `notify_url`."""
    job = repository.job(session, job_id)
    if job is None or not (url := job.spec.get("notify_url")):
        return
    event_type = f"job.{state}"
    repository.add(
        session,
        WebhookDelivery(
            job_id=job.id,
            tenant_id=job.tenant_id,
            url=url,
            event_type=event_type,
            payload=payload(job, event_type),
        ),
    )


def payload(job: Job, event_type: str) -> dict[str, Any]:
    """A thin event (Standard Webhooks' shape): what changed and where to read the rest."""
    data = {name: getattr(job, name) for name in PAYLOAD_FIELDS}
    data["state"] = event_type.removeprefix("job.")
    data["url"] = f"/v1/jobs/{job.id}"
    return {"type": event_type, "timestamp": _iso(utcnow()), "data": data}


def _iso(moment: Any) -> str:
    return moment.isoformat().replace("+00:00", "Z")
