"""The feedback loop: what happened to a message after it was sent, as facts on `messages` and
as Segment `track` events in the `events` outbox.

Each fact is recorded once (the first timestamp wins) and becomes an event with a messageId
made from the fact (`fb:<message id>:opened`, ...), so a repeated callback or pixel fetch
stores nothing new. The router applies these events like any other, so a journey can branch
or `wait_for` on `Email Opened`, `Email Link Clicked`, `Message Delivered`, `Message Bounced`
and `Unsubscribed`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg

from core.logs import get_logger
from models.segment import parse_event
from store.events import insert_events

log = get_logger("feedback")

Conn = asyncpg.Connection | asyncpg.Pool
BounceKind = Literal["hard", "soft", "complaint"]

EMAIL_OPENED = "Email Opened"
EMAIL_LINK_CLICKED = "Email Link Clicked"
MESSAGE_DELIVERED = "Message Delivered"
MESSAGE_BOUNCED = "Message Bounced"
UNSUBSCRIBED = "Unsubscribed"

_SKIP_REASON: dict[BounceKind, str] = {
    "hard": "hard_bounce",
    "soft": "soft_bounce",
    "complaint": "complaint",
}
_COLUMNS = "id, customer_id, journey_id, step_id, channel, address, links, test"


@dataclass(frozen=True)
class SentMessage:
    id: int
    customer_id: str
    journey_id: str | None
    step_id: str | None
    channel: str
    address: str | None
    links: list[str]
    test: bool

    @property
    def properties(self) -> dict[str, Any]:
        return {
            "message_id": self.id,
            "journey_id": self.journey_id,
            "step_id": self.step_id,
            "channel": self.channel,
        }


def _message(row: asyncpg.Record | None) -> SentMessage | None:
    if row is None:
        return None
    links = row["links"] if isinstance(row["links"], list) else []
    return SentMessage(**{**dict(row), "links": [u for u in links if isinstance(u, str)]})


async def get_message(conn: Conn, message_id: int) -> SentMessage | None:
    return _message(
        await conn.fetchrow(f"SELECT {_COLUMNS} FROM messages WHERE id = $1", message_id)
    )


async def find_by_provider_id(conn: Conn, channel: str, provider_id: str) -> SentMessage | None:
    """The message a provider callback is about. An SMTP Message-ID matches with or without
    its angle brackets (ESPs report it both ways)."""
    bare = provider_id.strip().strip("<>")
    candidates = list(dict.fromkeys([provider_id.strip(), bare, f"<{bare}>"]))
    return _message(
        await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM messages WHERE channel = $1 AND provider_id = ANY($2::text[]) "
            "ORDER BY id LIMIT 1",
            channel,
            candidates,
        )
    )


async def adopt_provider_id(
    conn: asyncpg.Connection, message_id: int, channel: str, provider_id: str
) -> SentMessage | None:
    """The message a callback URL of ours names (`?m=<id>`), on that channel. A callback can
    arrive before the send has written the provider's id: then it is recorded here."""
    return _message(
        await conn.fetchrow(
            "UPDATE messages SET provider_id = coalesce(provider_id, $3) "
            f"WHERE id = $1 AND channel = $2 RETURNING {_COLUMNS}",
            message_id,
            channel,
            provider_id,
        )
    )


# A phone number as digits (and its leading '+'): `+1 (555) 765-4321` and `+1.555.765.4321`
# are one number. The same expression, in SQL, is the `ix_customers_phone` index.
PHONE_SQL = "regexp_replace(traits->>'phone', '[^0-9+]', '', 'g')"
_NOT_PHONE = re.compile(r"[^0-9+]")


def normalize_phone(phone: str) -> str:
    """A phone number the way PHONE_SQL writes it ('' if it has no digits)."""
    return _NOT_PHONE.sub("", phone)


def normalize_address(channel: str, address: str) -> str:
    """The form addresses take in `suppressions`: email case-insensitive, phones as digits."""
    if channel == "email":
        return address.strip().lower()
    if channel == "sms":
        return normalize_phone(address)
    return address.strip()


# An erased customer's suppressions and opt-outs are kept under this hashed form of the address
# (store.erasure): `sha256:` + hex sha256 of `channel:normalised address`.
HASH_PREFIX = "sha256:"
_HASHED = re.compile(r"sha256:[0-9a-f]{64}")
# A hashed row with this reason is a topic-level opt-out of an erased customer: it blocks
# marketing sends to the address, not transactional ones. Every other reason blocks all sends.
MARKETING_OPT_OUT = "unsubscribed"
# The `source` of the `*` opt-out an inbound SMS STOP writes (api.routes.providers._SOURCE).
SMS_KEYWORD_SOURCE = "sms_keyword"


def hashed_address(channel: str, address: str) -> str:
    """The hashed key of an address in `suppressions`.

    Unpeppered: the contact policy must compute it from an address alone, and there is no
    pepper setting yet (adding one later means re-hashing these rows)."""
    digest = hashlib.sha256(f"{channel}:{normalize_address(channel, address)}".encode())
    return HASH_PREFIX + digest.hexdigest()


def suppression_keys(channel: str, address: str) -> list[str]:
    """Every `suppressions.address` that stands for this address: plain and hashed. A hashed
    key itself (as `GET /v1/suppressions` lists it) stands only for itself: normalising it as
    a phone number would strip it to its digits."""
    key = address.strip().lower()
    if _HASHED.fullmatch(key):
        return [key]
    return [normalize_address(channel, address), hashed_address(channel, address)]


async def emit_event(
    conn: asyncpg.Connection,
    customer_id: str,
    event_name: str,
    properties: dict[str, Any],
    message_id: str,
) -> bool:
    """Store a `track` event for a customer in the events outbox, in the caller's transaction.

    The event carries the customer's `userId` (else an `anonymousId`) so the router resolves it
    to that customer, and `message_id` as its messageId, so the same fact stored twice is
    skipped.

    Returns:
        Whether a new event was stored (False for a duplicate, or a customer without ids).
    """
    ident = await conn.fetchrow(
        "SELECT kind, value FROM identities WHERE kind IN ('user', 'anonymous') AND customer_id = "
        "(SELECT coalesce(merged_into, id) FROM customers WHERE id = $1) "
        "ORDER BY (kind = 'user') DESC, created_at, value LIMIT 1",
        customer_id,
    )
    if ident is None:
        log.warning("feedback.no_identity", customer_id=customer_id, event=event_name)
        return False
    event = parse_event(
        {
            "type": "track",
            "event": event_name,
            "userId" if ident["kind"] == "user" else "anonymousId": ident["value"],
            "properties": properties,
            "messageId": message_id,
            "context": {"library": {"name": "journeys-feedback"}},
        },
        now=datetime.now(UTC),
    )
    return await insert_events(conn, [event.model_dump()]) == 1


async def _emit(
    conn: asyncpg.Connection, msg: SentMessage, name: str, fact: str, **extra: Any
) -> bool:
    if msg.test:
        return False  # test sends are previews: no journey reacts to them
    return await emit_event(
        conn, msg.customer_id, name, {**msg.properties, **extra}, f"fb:{msg.id}:{fact}"
    )


async def record_open(conn: asyncpg.Connection, msg: SentMessage) -> bool:
    """First open: `opened_at` set and `Email Opened` emitted. Returns whether it was the first."""
    first = await conn.fetchval(
        "UPDATE messages SET opened_at = now() WHERE id = $1 AND opened_at IS NULL RETURNING true",
        msg.id,
    )
    if first:
        await _emit(conn, msg, EMAIL_OPENED, "opened")
    return bool(first)


async def record_click(conn: asyncpg.Connection, msg: SentMessage, url: str) -> bool:
    """`clicked_at` (first click) and one `Email Link Clicked` per URL. Returns whether this
    URL was clicked for the first time."""
    await conn.execute(
        "UPDATE messages SET clicked_at = coalesce(clicked_at, now()) WHERE id = $1", msg.id
    )
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return await _emit(conn, msg, EMAIL_LINK_CLICKED, f"click:{digest}", url=url)


async def record_delivered(conn: asyncpg.Connection, msg: SentMessage) -> bool:
    first = await conn.fetchval(
        "UPDATE messages SET delivered_at = now() WHERE id = $1 AND delivered_at IS NULL "
        "RETURNING true",
        msg.id,
    )
    if first:
        await _emit(conn, msg, MESSAGE_DELIVERED, "delivered")
    return bool(first)


async def record_bounce(
    conn: asyncpg.Connection, msg: SentMessage, kind: BounceKind, reason: str | None = None
) -> bool:
    """The message bounced (or the recipient complained): status `bounced`, and a hard bounce
    or a complaint suppresses the address on that channel. Returns whether the event was new.
    """
    await conn.execute(
        "UPDATE messages SET status = 'bounced', error = coalesce($3, error), skip_reason = "
        # a soft bounce reported after a hard one does not make the address look fine again
        "CASE WHEN $2 = 'soft_bounce' AND skip_reason IN ('hard_bounce', 'complaint') "
        "THEN skip_reason ELSE $2 END WHERE id = $1",
        msg.id,
        _SKIP_REASON[kind],
        reason,
    )
    if kind != "soft" and msg.address:
        await suppress(conn, msg.channel, msg.address, _SKIP_REASON[kind])
    fact = "complained" if kind == "complaint" else "bounced"
    return await _emit(conn, msg, MESSAGE_BOUNCED, fact, bounce_type=kind, reason=reason)


async def set_subscription(
    conn: asyncpg.Connection, customer_id: str, channel: str, topic: str, status: str, source: str
) -> bool:
    """Record a consent choice; becoming unsubscribed emits `Unsubscribed` (channel, topic,
    source). Returns whether the status changed.

    The event's messageId names the state it left (`updated_at` of the row before), so two
    concurrent unsubscribes from the same state store one event, and a later one after a
    resubscribe stores another.
    """
    row = await conn.fetchrow(
        "WITH prev AS (SELECT status, updated_at FROM subscriptions "
        "WHERE customer_id = $1 AND channel = $2 AND topic = $3) "
        "INSERT INTO subscriptions (customer_id, channel, topic, status, source) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (customer_id, channel, topic) "
        # The same choice again keeps its source: a STOP after an admin's opt-out must not
        # make it look like the STOP's (a START would then undo the admin's choice).
        "DO UPDATE SET status = $4, "
        "source = CASE WHEN subscriptions.status = $4 THEN subscriptions.source ELSE $5 END, "
        "updated_at = CASE WHEN subscriptions.status = $4 THEN subscriptions.updated_at "
        "ELSE now() END "
        "RETURNING (SELECT status FROM prev) AS before, (SELECT updated_at FROM prev) AS since",
        customer_id,
        channel,
        topic,
        status,
        source,
    )
    changed = row["before"] != status
    if changed and status == "unsubscribed":
        since = row["since"].isoformat() if row["since"] else "new"
        await emit_event(
            conn,
            customer_id,
            UNSUBSCRIBED,
            {"channel": channel, "topic": topic, "source": source},
            f"fb:unsub:{customer_id}:{channel}:{topic}:{since}",
        )
    return changed


async def undo_channel_opt_out(
    conn: asyncpg.Connection, customer_id: str, channel: str, source: str
) -> bool:
    """Undo an opt-out of a whole channel made by `source` (an SMS STOP): its `*` row goes, so
    the channel follows CONSENT_DEFAULT and the topic choices again, which stay as they were.
    A `*` row made another way (an admin, a link) stays too. Returns whether a row went."""
    status = await conn.execute(
        "DELETE FROM subscriptions WHERE customer_id = $1 AND channel = $2 AND topic = '*' "
        "AND status = 'unsubscribed' AND source = $3",
        customer_id,
        channel,
        source,
    )
    return status != "DELETE 0"


async def suppress(conn: asyncpg.Connection, channel: str, address: str, reason: str) -> None:
    """Never send to this address on this channel again; a suppression already there (and
    its reason) is kept."""
    await conn.execute(
        "INSERT INTO suppressions (channel, address, reason) VALUES ($1, $2, $3) "
        "ON CONFLICT DO NOTHING",
        channel,
        normalize_address(channel, address),
        reason,
    )


async def unsuppress(conn: asyncpg.Connection, channel: str, address: str, reason: str) -> bool:
    """Lift a suppression, only if it was made for `reason` (a START lifts a STOP, never a hard
    bounce or a complaint), plain or hashed (a STOP of an erased customer's number is kept
    hashed). Returns whether one was lifted."""
    status = await conn.execute(
        "DELETE FROM suppressions WHERE channel = $1 AND address = ANY($2::text[]) AND reason = $3",
        channel,
        suppression_keys(channel, address),
        reason,
    )
    return status != "DELETE 0"


async def remove_suppression(conn: Conn, channel: str, address: str) -> int:
    """Lift every suppression of this address, plain and hashed, whatever its reason (an
    operator's removal). Returns how many rows went."""
    status = await conn.execute(
        "DELETE FROM suppressions WHERE channel = $1 AND address = ANY($2::text[])",
        channel,
        suppression_keys(channel, address),
    )
    return int(status.split()[-1])


async def suppression_reasons(conn: Conn, channel: str, address: str) -> set[str]:
    """Reasons this address is blocked for (plain and hashed rows); empty: not blocked.
    `MARKETING_OPT_OUT` alone blocks only marketing sends."""
    rows = await conn.fetch(
        "SELECT reason FROM suppressions WHERE channel = $1 AND address = ANY($2::text[])",
        channel,
        suppression_keys(channel, address),
    )
    return {r["reason"] for r in rows}


# Same expression and predicate as the partial index ix_customers_phone, so it is used.
CUSTOMERS_BY_PHONE = (
    f"SELECT id FROM customers WHERE merged_into IS NULL AND {PHONE_SQL} = $1 ORDER BY id"
)


async def customers_by_phone(conn: Conn, phone: str) -> list[str]:
    """Live (not merged-away) customers whose `phone` trait is this number, however either
    is formatted (compared as `normalize_phone`)."""
    number = normalize_phone(phone)
    if not number:
        return []
    return [r["id"] for r in await conn.fetch(CUSTOMERS_BY_PHONE, number)]
