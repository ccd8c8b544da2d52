"""All SQL for models: adding an upload, the worker's validation, and the reaper's scan."""

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.core.orm import Model
from service.models.states import ModelState


def add(session: Session, model: Model) -> None:
    session.add(model)


def by_id(session: Session, model_id: str) -> Model | None:
    """Any tenant's model: for the worker, which has ids from the queue, never from a user."""
    return session.get(Model, model_id)


def settle(
    session: Session, model_id: str, state: ModelState, summary: dict[str, Any], reason: str | None
) -> None:
    """validating → `state`, once: a second validation of the same model changes nothing."""
    session.execute(
        update(Model)
        .where(Model.id == model_id, Model.state == ModelState.VALIDATING)
        .values(state=state, summary=summary, rejection_reason=reason)
    )


def validating_since(session: Session, cutoff: datetime) -> list[str]:
    """Models still validating that were uploaded before `cutoff`."""
    return list(
        session.scalars(
            select(Model.id).where(Model.state == ModelState.VALIDATING, Model.created_at < cutoff)
        )
    )
