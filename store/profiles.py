"""Identity resolution and the unified profile.

Events carry a `userId` and/or an `anonymousId`; `alias` adds a `previousId`. Each id maps to
one customer (table `identities`). When an event ties together ids that belong to two
customers, the anonymous one is merged into the known one: identities, events, messages and
running journeys move to the survivor, and the merge is reported so running workflows follow.

An event's profile effects (traits, timezone, email / phone identities) are applied once
(`events.applied_at`): an event routed again, handed back by a finished run or replayed from
the dead letters, must not roll back what a newer `identify` set. And an event applied out of
order (a dead letter replayed, an event arriving late with an older timestamp) sets only the
traits (and timezone) that no applied event with a newer timestamp set: the newest value of
each trait wins, whatever the order events were routed in. The events table is the record
(no per-trait bookkeeping): the check reads the customer's applied events newer than the
oldest pending one, which is nothing at all in the usual, in-order case.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from store.erasure import customers_under_erasure


@dataclass
class StoredEvent:
    id: int
    message_id: str
    type: str
    event: str | None
    user_id: str | None
    anonymous_id: str | None
    previous_id: str | None
    timestamp: datetime
    payload: dict[str, Any]
    customer_id: str = ""

    def __post_init__(self) -> None:
        # PostgreSQL keeps `infinity` / `-infinity`; they come back as naive datetimes that
        # cannot be ordered with the others (nor mean a moment): such an event is unroutable.
        ts = self.timestamp
        if ts.tzinfo is None or ts.replace(tzinfo=None) in (datetime.min, datetime.max):
            raise UnroutableEvent(f"timestamp: {ts.isoformat()} is not a usable moment")

    @property
    def traits(self) -> dict[str, Any]:
        return _traits_of(self.type, self.payload)

    @property
    def timezone(self) -> object:
        """The zone the event gives (context first), not yet checked."""
        return _timezone_of(self.type, self.payload)


def _traits_of(type_: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The traits an event sets on the profile."""
    traits = payload.get("traits") or {}  # identify: with context.traits (parse_event)
    if type_ == "track":  # the spec's `context.traits`; a top-level `traits` is not
        context = payload.get("context")
        traits = (context.get("traits") if isinstance(context, dict) else None) or {}
    elif type_ != "identify":
        traits = {}
    return traits if isinstance(traits, dict) else {}


def _timezone_of(type_: str, payload: dict[str, Any]) -> object:
    context = payload.get("context")
    zone = context.get("timezone") if isinstance(context, dict) else None
    return zone or _traits_of(type_, payload).get("timezone")


class UnroutableEvent(ValueError):
    """A stored event that can never be routed as it is (the router sets it aside)."""


@dataclass
class Merge:
    loser: str
    survivor: str
    moved_running: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


@dataclass
class Resolution:
    merges: list[Merge] = field(default_factory=list)
    new_customers: set[str] = field(default_factory=set)
    # Customers that gained a userId, anonymousId, email or phone (their runs' CustomerRefs).
    identified: set[str] = field(default_factory=set)


def _ids(e: StoredEvent) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if e.user_id:
        out.append(("user", e.user_id))
    if e.anonymous_id:
        out.append(("anonymous", e.anonymous_id))
    return out


async def resolve_and_apply(conn: asyncpg.Connection, events: list[StoredEvent]) -> Resolution:
    """Give every event its customer, update traits and identities, in timestamp order.

    Runs inside the caller's transaction; all look-ups are batched per chunk.
    """
    res = Resolution()
    # Re-read under lock, not trusted from the caller: an earlier attempt may have committed.
    applied = {
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM events WHERE id = ANY($1::bigint[]) AND applied_at IS NOT NULL "
            "FOR UPDATE",
            [e.id for e in events],
        )
    }
    users = sorted({e.user_id for e in events if e.user_id} | {
        e.previous_id for e in events if e.previous_id})  # fmt: skip
    anons = sorted({e.anonymous_id for e in events if e.anonymous_id} | {
        e.previous_id for e in events if e.previous_id})  # fmt: skip
    owner: dict[tuple[str, str], str] = {}
    for r in await conn.fetch(
        "SELECT kind, value, customer_id FROM identities "
        "WHERE (kind = 'user' AND value = ANY($1)) OR (kind = 'anonymous' AND value = ANY($2))",
        users,
        anons,
    ):
        owner[(r["kind"], r["value"])] = r["customer_id"]

    new_ids: list[tuple[str, str, str]] = []
    traits: dict[str, dict[str, Any]] = {}
    zones: dict[str, str] = {}
    pending: list[StoredEvent] = []  # events whose traits and zone are applied now

    def attach(key: tuple[str, str], cid: str) -> None:
        if key not in owner:
            owner[key] = cid
            new_ids.append((key[0], key[1], cid))

    for e in sorted(events, key=lambda x: (x.timestamp, x.id)):
        keys = _ids(e)
        if e.type == "alias" and e.previous_id:
            prev = next(
                (k for k in (("user", e.previous_id), ("anonymous", e.previous_id)) if k in owner),
                ("anonymous", e.previous_id),
            )
            keys.append(prev)
        known = [owner[k] for k in keys if k in owner]
        if not known:
            cid = uuid.uuid4().hex
            res.new_customers.add(cid)
        else:
            # The survivor is the customer of the userId when there is one.
            cid = known[0]
            others = [o for o in dict.fromkeys(known[1:]) if o != cid]
            for other in await _mergeable(conn, cid, others):
                await _merge(conn, loser=other, survivor=cid, owner=owner, res=res)
        for k in keys:
            attach(k, cid)
        e.customer_id = cid
        if e.id in applied:
            continue
        pending.append(e)
        for kind in ("email", "phone"):
            value = e.traits.get(kind)
            if isinstance(value, str) and 0 < len(value.strip()) <= 512:
                attach((kind, value.strip().lower()), cid)

    # A merged-away customer may still be referenced by events earlier in the chunk.
    remap = {m.loser: m.survivor for m in res.merges}
    for e in events:
        while e.customer_id in remap:
            e.customer_id = remap[e.customer_id]

    # In timestamp order (as `pending` is), a later event's traits override an earlier one's;
    # a trait an applied event with a newer timestamp set is left as it is.
    newer = await _newer_applied(conn, pending)
    for e in pending:
        cid, seen = e.customer_id, newer.get(e.customer_id, {})
        fresh = {k: v for k, v in e.traits.items() if not _set_later(seen, k, e.timestamp)}
        if fresh:
            traits.setdefault(cid, {}).update(fresh)
        tz = e.timezone
        if valid_timezone(tz) and not _set_later(seen, _ZONE, e.timestamp):
            zones[cid] = tz  # type: ignore[assignment]

    if res.new_customers:
        await conn.executemany(
            "INSERT INTO customers (id) VALUES ($1) ON CONFLICT DO NOTHING",
            [(c,) for c in res.new_customers],
        )
    if new_ids:
        # Only identities really added count (an identify repeating a known email adds none).
        inserted = await conn.fetch(
            "INSERT INTO identities (kind, value, customer_id) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) "
            "ON CONFLICT DO NOTHING RETURNING customer_id",
            [k for k, _, _ in new_ids],
            [v for _, v, _ in new_ids],
            [remap.get(c, c) for _, _, c in new_ids],
        )
        res.identified = {r["customer_id"] for r in inserted}
    if traits:
        await conn.executemany(
            "UPDATE customers SET traits = traits || $2::jsonb, updated_at = now() WHERE id = $1",
            [(remap.get(c, c), t) for c, t in traits.items()],
        )
    if zones:
        await conn.executemany(
            "UPDATE customers SET timezone = $2 WHERE id = $1",
            [(remap.get(c, c), z) for c, z in zones.items()],
        )
    await conn.execute(
        "UPDATE events SET customer_id = u.cid, applied_at = coalesce(applied_at, now()) "
        "FROM unnest($1::bigint[], $2::text[]) AS u(id, cid) WHERE events.id = u.id",
        [e.id for e in events],
        [e.customer_id for e in events],
    )
    return res


_ZONE = "\x00timezone"  # the zone's key among traits in `_newer_applied` (no trait has it)


def _set_later(seen: dict[str, datetime], key: str, when: datetime) -> bool:
    newest = seen.get(key)
    return newest is not None and newest > when


async def _newer_applied(
    conn: asyncpg.Connection, pending: list[StoredEvent]
) -> dict[str, dict[str, datetime]]:
    """Per customer, per trait (and `_ZONE`): the newest timestamp of an applied event that
    set it, among applied events newer than the customer's oldest pending event."""
    oldest: dict[str, datetime] = {}
    for e in pending:
        if e.traits or e.timezone:
            cid = e.customer_id
            oldest[cid] = min(oldest.get(cid, e.timestamp), e.timestamp)
    if not oldest:
        return {}
    rows = await conn.fetch(
        "SELECT e.customer_id, e.timestamp, e.type, e.payload FROM events e "
        "JOIN unnest($1::text[], $2::timestamptz[]) AS c(cid, ts) "
        "ON e.customer_id = c.cid AND e.timestamp > c.ts "
        "WHERE e.applied_at IS NOT NULL AND e.type IN ('identify', 'track')",
        list(oldest),
        list(oldest.values()),
    )
    out: dict[str, dict[str, datetime]] = {}
    for r in rows:
        seen = out.setdefault(r["customer_id"], {})
        keys = list(_traits_of(r["type"], r["payload"]))
        if valid_timezone(_timezone_of(r["type"], r["payload"])):
            keys.append(_ZONE)
        for k in keys:
            if k not in seen or r["timestamp"] > seen[k]:
                seen[k] = r["timestamp"]
    return out


def valid_timezone(name: object) -> bool:
    """An IANA zone we can compute with; anything else is ignored, never stored."""
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


async def _merge(
    conn: asyncpg.Connection,
    *,
    loser: str,
    survivor: str,
    owner: dict[tuple[str, str], str],
    res: Resolution,
) -> None:
    # A send deciding for either customer (caps, consent) holds this lock: it decides before
    # the merge or after it, never against a half-moved message history.
    for cid in sorted({loser, survivor}):
        await lock_contact(conn, cid)
    await conn.execute(
        "UPDATE customers s SET traits = l.traits || s.traits, updated_at = now() "
        "FROM customers l WHERE s.id = $2 AND l.id = $1",
        loser,
        survivor,
    )
    for table in ("identities", "events", "messages"):
        await conn.execute(
            f"UPDATE {table} SET customer_id = $2 WHERE customer_id = $1", loser, survivor
        )
    live = {
        (r["journey_id"], r["run_key"])
        for r in await conn.fetch(
            "SELECT journey_id, run_key FROM journey_runs WHERE customer_id = $1 "
            "AND status IN ('starting', 'running')",
            survivor,
        )
    }
    moved = await conn.fetch(
        "UPDATE journey_runs SET customer_id = $2 WHERE customer_id = $1 "
        "RETURNING enrollment_id, workflow_id, status, journey_id, run_key",
        loser,
        survivor,
    )
    # The survivor is already in that journey: the merged-away run ends, or it would send
    # every message a second time.
    duplicate = [
        r for r in moved
        if r["status"] in ("starting", "running") and (r["journey_id"], r["run_key"]) in live
    ]  # fmt: skip
    if duplicate:
        await conn.execute(
            "UPDATE journey_runs SET status = 'exited', exit_reason = 'merged', ended_at = now() "
            "WHERE enrollment_id = ANY($1::text[])",
            [r["enrollment_id"] for r in duplicate],
        )
    # Customers merged into the loser earlier now lead to the survivor too (one hop, always).
    await conn.execute(
        "UPDATE customers SET merged_into = $2 WHERE id = $1 OR merged_into = $1", loser, survivor
    )
    for k, v in list(owner.items()):
        if v == loser:
            owner[k] = survivor
    ended = {r["enrollment_id"] for r in duplicate}
    running = [
        r["workflow_id"]
        for r in moved
        if r["status"] in ("starting", "running") and r["enrollment_id"] not in ended
    ]
    res.merges.append(
        Merge(
            loser=loser,
            survivor=survivor,
            moved_running=running,
            duplicates=[r["workflow_id"] for r in duplicate],
        )
    )


# -- merges and running erasures ---------------------------------------------------------------
async def _mergeable(conn: asyncpg.Connection, survivor: str, losers: list[str]) -> list[str]:
    """The losers that may merge into `survivor`: none if a running erasure is deleting the
    survivor, and never one it is deleting. Such a merge would move the erased person's rows
    to a profile the erasure does not delete, or another profile's rows into the deletion.
    The event goes to its userId's customer unmerged, and the erased ids stay with the erased
    customer until they are deleted with it; an event naming them afterwards finds them free.
    (A merge routed before the erasure's row was committed is found by the erasure itself:
    `store.erasure.current_customer_ids`.)"""
    if not losers:
        return []
    held = await customers_under_erasure(conn, [survivor, *losers])
    if survivor in held:
        return []
    return [o for o in losers if o not in held]


async def lock_contact(conn: asyncpg.Connection, customer_id: str) -> None:
    """The per-customer contact-policy lock, held to the end of the transaction.

    The same key as `activities.contact_policy.ContactPolicy.lock` (a send takes one; a merge
    takes both customers' in id order, and only the single active router merges, so the
    order cannot deadlock)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('contact:' || $1))", customer_id)


async def find_customer(conn: asyncpg.Connection | asyncpg.Pool, ref: str) -> str | None:
    """A customer by our id, userId, anonymousId or email; merged ids lead to the survivor."""
    row = await conn.fetchrow(
        "SELECT id, merged_into FROM customers WHERE id = $1", ref
    ) or await conn.fetchrow(
        "SELECT c.id, c.merged_into FROM identities i JOIN customers c ON c.id = i.customer_id "
        "WHERE (i.kind = 'user' AND i.value = $1) OR (i.kind = 'anonymous' AND i.value = $1) "
        "OR (i.kind = 'email' AND i.value = lower($1)) ORDER BY (i.kind = 'user') DESC LIMIT 1",
        ref,
    )
    if row is None:
        return None
    return row["merged_into"] or row["id"]


async def profile_stats(
    conn: asyncpg.Connection | asyncpg.Pool, customer_id: str
) -> dict[str, Any]:
    rows = await conn.fetch(
        "SELECT coalesce(event, type) AS name, count(*) AS n, max(timestamp) AS last "
        "FROM events WHERE customer_id = $1 GROUP BY 1",
        customer_id,
    )
    return {
        "events": {r["name"]: r["n"] for r in rows},
        "last_seen": {r["name"]: r["last"].isoformat() for r in rows},
        "total_events": sum(r["n"] for r in rows),
    }
