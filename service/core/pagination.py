"""Keyset pagination: an opaque cursor encodes the (created_at, id) of the last item."""

import base64
import json
from datetime import datetime

from service.core.problems import ProblemError

MAX_LIMIT = 200


def encode_cursor(created_at: datetime, item_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), item_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    if not cursor:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, item_id = json.loads(base64.urlsafe_b64decode(padded))
        item_id = str(item_id)
        # JSON may hold a lone surrogate ("\ud800"): refused here (UnicodeEncodeError is a
        # ValueError), not by the database driver as a 500
        item_id.encode()
        return datetime.fromisoformat(created), item_id
    except (ValueError, TypeError, RecursionError) as error:
        raise ProblemError(400, "invalid_cursor", "the pagination cursor is not valid") from error
