"""Timestamps as the API returns them: UTC, with the offset stated (`…Z`). SQLite hands back
naive datetimes; they are UTC (`orm.utcnow`), and a client must not have to guess."""

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
