"""The Segment HTTP Tracking API envelope (spec copy: ../shared/specs/segment/).

Validation returns errors that name the field (`batch[3].userId`), never a stack trace.

Timestamps follow the spec's clock-skew rule without ever losing an event. A `timestamp` (or
`originalTimestamp`) outside [TIMESTAMP_MIN (2000-01-01 UTC), now + MAX_CLOCK_SKEW (one day)] is
a device clock, not history (phones reset to 1970; `0001-01-01`, `9999-12-31`), and stored as is
it would be `-infinity`/`infinity` or overflow in PostgreSQL and break routing. Refusing it
would make Segment and RudderStack SDKs drop the whole batch (they drop 4xx batches), so the
event is kept and its time corrected as Segment does: `receivedAt - (sentAt - originalTimestamp)`
when the device's `sentAt` is known and the result is in range, else the time it was received.
The client's value stays in the payload as `originalTimestamp`. Only a value that is not an
ISO-8601 date at all is a 400 naming the field.

`context.traits` (where the RudderStack SDK puts identify traits) are merged under an
identify's `traits`, top-level traits winning, so the router applies one `traits` object
whatever the client. A `track`'s `context.traits` (the spec's way to carry traits on a track)
are applied by the router (`store.profiles.StoredEvent.traits`); its top-level `traits` are not.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.json_schema import SkipJsonSchema

from models.safe_json import UnsafeJson, find_unsafe

EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_EVENTS = 2500
MAX_ID_CHARS = 512  # messageId, userId, anonymousId, previousId, event name
TIMESTAMP_MIN = datetime(2000, 1, 1, tzinfo=UTC)
MAX_CLOCK_SKEW = timedelta(days=1)
TIME_FIELDS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")
TRAITS_FROM_CONTEXT = ("identify",)


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
    """An ISO-8601 date in UTC (any year; see `_in_range`), or None when absent or overflowing.

    `0001-01-01T00:00:00+14:00` parses but is before year 1 in UTC: that overflow is a device
    clock like any other out-of-range value, so it reads as "no usable time" (None), not an
    error."""
    v = raw.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise InvalidEvent(f"{where}{key}", "must be an ISO-8601 date string")
    try:
        ts = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidEvent(f"{where}{key}", f"invalid ISO-8601 date {v[:64]!r}") from None
    try:
        return ts.astimezone(UTC) if ts.tzinfo else ts.replace(tzinfo=UTC)
    except OverflowError:
        return None


def _in_range(ts: datetime | None, now: datetime) -> bool:
    return ts is not None and TIMESTAMP_MIN <= ts <= now + MAX_CLOCK_SKEW


def _event_time(
    times: dict[str, datetime | None],
    raw: dict[str, Any],
    batch_sent_at: datetime | None,
    now: datetime,
) -> datetime:
    """The event's time: its own when sane; else corrected for the device's clock skew with
    `sentAt` (the spec's formula); else the time it was received. See the module docstring."""
    given = times["timestamp"] or times["originalTimestamp"]
    if _in_range(given, now):
        assert given is not None
        return given
    has_given = raw.get("timestamp") is not None or raw.get("originalTimestamp") is not None
    sent_at = times["sentAt"] or batch_sent_at
    if has_given and given is not None and sent_at is not None:
        try:
            corrected = now - (sent_at - given)
        except OverflowError:
            corrected = None
        if _in_range(corrected, now):
            assert corrected is not None
            return corrected
    return now


def _traits(raw: dict[str, Any], typ: str) -> dict[str, Any] | None:
    """`context.traits` under `traits` (top-level keys win) for identify."""
    context = raw.get("context")
    extra = context.get("traits") if isinstance(context, dict) else None
    if typ not in TRAITS_FROM_CONTEXT or not isinstance(extra, dict) or not extra:
        return None
    if "traits" in raw and raw["traits"] is not None and not isinstance(raw["traits"], dict):
        return None  # refused below, naming `traits`
    return {**extra, **(raw.get("traits") or {})}


def parse_event(
    raw: Any,
    *,
    where: str = "",
    kind: str | None = None,
    now: datetime | None = None,
    batch_sent_at: datetime | None = None,
) -> AcceptedEvent:
    """Validate one event; `kind` comes from the URL for single-event endpoints."""
    if not isinstance(raw, dict):
        raise InvalidEvent(where.rstrip(".") or "body", "must be a JSON object")
    now = now or datetime.now(UTC)
    try:
        # First: a lone surrogate or deep nesting would break the size check's encoding.
        find_unsafe(raw, where.rstrip("."))
    except UnsafeJson as err:
        raise InvalidEvent(err.field, err.message) from None
    dumped = json.dumps(raw, separators=(",", ":"), ensure_ascii=False, default=str)
    size = len(dumped.encode())
    if size > MAX_EVENT_BYTES:
        raise InvalidEvent(where.rstrip(".") or "body", f"event is {size} bytes; limit is 32 KB")
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
    times = {key: _time(raw, key, where) for key in TIME_FIELDS}
    timestamp = _event_time(times, raw, batch_sent_at, now)
    payload = {**raw, "type": typ, "messageId": message_id, "timestamp": timestamp.isoformat()}
    if raw.get("timestamp") is not None and timestamp != times["timestamp"]:
        payload.setdefault("originalTimestamp", raw["timestamp"])  # the client's, corrected
    payload.pop("writeKey", None)
    if (traits := _traits(raw, typ)) is not None:
        payload["traits"] = traits
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
    try:
        find_unsafe({k: v for k, v in body.items() if k != "batch"})
    except UnsafeJson as err:
        raise InvalidEvent(err.field, err.message) from None
    sent_at = _time(body, "sentAt", "")
    shared_ctx = body.get("context") if isinstance(body.get("context"), dict) else None
    out = []
    for i, item in enumerate(items):
        if shared_ctx and isinstance(item, dict) and "context" not in item:
            item = {**item, "context": shared_ctx}
        out.append(parse_event(item, where=f"batch[{i}].", now=now, batch_sent_at=sent_at))
    return out


# -- OpenAPI description of the calls --------------------------------------------------------
# Documentation only: the routes read the raw body (gzip, limits, errors naming `batch[3]...`)
# and validate it with `parse_event` / `parse_batch` above, which stay the contract.

_ID = Field(default=None, max_length=MAX_ID_CHARS, min_length=1)
_WHO = {"anyOf": [{"required": ["userId"]}, {"required": ["anonymousId"]}]}


class _Call(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_WHO)

    userId: str | SkipJsonSchema[None] = _ID
    anonymousId: str | SkipJsonSchema[None] = _ID
    messageId: str | SkipJsonSchema[None] = Field(
        default=None, max_length=MAX_ID_CHARS, description="deduplicates retries"
    )
    timestamp: datetime | SkipJsonSchema[None] = Field(
        default=None, description="ISO-8601; between 2000-01-01 and now + 1 day"
    )
    originalTimestamp: datetime | SkipJsonSchema[None] = None
    sentAt: datetime | SkipJsonSchema[None] = None
    context: dict[str, Any] | SkipJsonSchema[None] = Field(
        default=None, description="`context.traits` apply to the profile (identify, track)"
    )
    integrations: dict[str, Any] | SkipJsonSchema[None] = None
    writeKey: str | SkipJsonSchema[None] = Field(
        default=None, description="instead of HTTP Basic auth"
    )


class TrackCall(_Call):
    event: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    properties: dict[str, Any] | SkipJsonSchema[None] = None


class IdentifyCall(_Call):
    traits: dict[str, Any] | SkipJsonSchema[None] = None


class PageCall(_Call):
    name: str | SkipJsonSchema[None] = None
    properties: dict[str, Any] | SkipJsonSchema[None] = None


class ScreenCall(PageCall):
    pass


class GroupCall(_Call):
    groupId: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    traits: dict[str, Any] | SkipJsonSchema[None] = None


class AliasCall(_Call):
    model_config = ConfigDict(extra="allow", json_schema_extra={})

    userId: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    previousId: str = Field(min_length=1, max_length=MAX_ID_CHARS)


CALL_MODELS: dict[str, type[_Call]] = {
    "track": TrackCall,
    "identify": IdentifyCall,
    "page": PageCall,
    "screen": ScreenCall,
    "group": GroupCall,
    "alias": AliasCall,
}


def _typed(kind: str, model: type[_Call]) -> type[BaseModel]:
    """The model as a batch item: with its `type`."""
    return create_model(
        f"{model.__name__}Item",
        __base__=model,
        type=(Literal[kind], Field()),  # type: ignore[valid-type]
    )


BatchItem = Annotated[
    Union[tuple(_typed(k, m) for k, m in CALL_MODELS.items())],  # type: ignore[misc]  # noqa: UP007
    Field(discriminator="type"),
]


class BatchCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    batch: list[BatchItem] = Field(max_length=MAX_BATCH_EVENTS)
    context: dict[str, Any] | SkipJsonSchema[None] = Field(
        default=None, description="shared by every event"
    )
    sentAt: datetime | SkipJsonSchema[None] = None
    writeKey: str | SkipJsonSchema[None] = None
