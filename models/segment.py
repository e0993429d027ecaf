"""The Segment HTTP Tracking API envelope (spec copy: ../shared/specs/segment/).

Validation returns errors that name the field (`batch[3].userId`), never a stack trace.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_EVENTS = 2500
MAX_ID_CHARS = 512  # messageId, userId, anonymousId, previousId, event name


class InvalidEvent(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class AcceptedEvent(BaseModel):
    """One validated event, ready for the `events` table."""

    message_id: str
    type: str
    event: str | None
    user_id: str | None
    anonymous_id: str | None
    previous_id: str | None
    timestamp: datetime
    payload: dict[str, Any]


def _id(raw: dict[str, Any], key: str, where: str) -> str | None:
    v = raw.get(key)
    if v is None or v == "":
        return None
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise InvalidEvent(f"{where}{key}", "must be a string")
    text = str(v)
    if len(text) > MAX_ID_CHARS:
        raise InvalidEvent(f"{where}{key}", f"is {len(text)} characters; limit is {MAX_ID_CHARS}")
    return text


def _time(raw: dict[str, Any], key: str, where: str) -> datetime | None:
    v = raw.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise InvalidEvent(f"{where}{key}", "must be an ISO-8601 date string")
    try:
        ts = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidEvent(f"{where}{key}", f"invalid ISO-8601 date {v!r}") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def parse_event(
    raw: Any, *, where: str = "", kind: str | None = None, now: datetime | None = None
) -> AcceptedEvent:
    """Validate one event; `kind` comes from the URL for single-event endpoints."""
    if not isinstance(raw, dict):
        raise InvalidEvent(where.rstrip(".") or "body", "must be a JSON object")
    dumped = json.dumps(raw, separators=(",", ":"), ensure_ascii=False, default=str)
    size = len(dumped.encode())
    if size > MAX_EVENT_BYTES:
        raise InvalidEvent(where.rstrip(".") or "body", f"event is {size} bytes; limit is 32 KB")
    if "\\u0000" in dumped and _has_nul(raw):
        # Valid JSON, but PostgreSQL text and jsonb cannot hold NUL: name the field.
        bad = next((k for k, v in raw.items() if _has_nul(k) or _has_nul(v)), "body")
        raise InvalidEvent(f"{where}{bad}", "contains a NUL character (\\u0000)")
    typ = kind or raw.get("type")
    if typ not in EVENT_TYPES:
        raise InvalidEvent(f"{where}type", f"must be one of {', '.join(EVENT_TYPES)}")
    user_id = _id(raw, "userId", where)
    anonymous_id = _id(raw, "anonymousId", where)
    previous_id = _id(raw, "previousId", where)
    if typ == "alias":
        if not user_id:
            raise InvalidEvent(f"{where}userId", "is required for alias")
        if not previous_id:
            raise InvalidEvent(f"{where}previousId", "is required for alias")
    elif not user_id and not anonymous_id:
        raise InvalidEvent(f"{where}userId", "userId or anonymousId is required")
    name = raw.get("event")
    if typ == "track":
        if not isinstance(name, str) or not name.strip():
            raise InvalidEvent(f"{where}event", "is required for track (a non-empty string)")
        if len(name) > MAX_ID_CHARS:
            raise InvalidEvent(
                f"{where}event", f"is {len(name)} characters; limit is {MAX_ID_CHARS}"
            )
    else:
        name = None
    for key in ("properties", "traits", "context", "integrations"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], dict):
            raise InvalidEvent(f"{where}{key}", "must be an object")
    message_id = _id(raw, "messageId", where) or f"gen-{uuid.uuid4()}"
    timestamp = (
        _time(raw, "timestamp", where)
        or _time(raw, "originalTimestamp", where)
        or now
        or datetime.now(UTC)
    )
    payload = {**raw, "type": typ, "messageId": message_id, "timestamp": timestamp.isoformat()}
    payload.pop("writeKey", None)
    return AcceptedEvent(
        message_id=message_id,
        type=typ,
        event=name,
        user_id=user_id,
        anonymous_id=anonymous_id,
        previous_id=previous_id,
        timestamp=timestamp,
        payload=payload,
    )


def parse_batch(body: Any) -> list[AcceptedEvent]:
    if not isinstance(body, dict):
        raise InvalidEvent("body", "must be a JSON object")
    items = body.get("batch")
    if not isinstance(items, list):
        raise InvalidEvent("batch", "is required and must be an array")
    if len(items) > MAX_BATCH_EVENTS:
        raise InvalidEvent("batch", f"has {len(items)} events; limit is {MAX_BATCH_EVENTS}")
    now = datetime.now(UTC)
    shared_ctx = body.get("context") if isinstance(body.get("context"), dict) else None
    out = []
    for i, item in enumerate(items):
        if shared_ctx and isinstance(item, dict) and "context" not in item:
            item = {**item, "context": shared_ctx}
        out.append(parse_event(item, where=f"batch[{i}].", now=now))
    return out
