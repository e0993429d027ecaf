"""Storing accepted events: the durable hand-off between the API and everything else."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

NOTIFY_CHANNEL = "events_ingested"

_COLUMNS = "id, message_id, type, event, user_id, anonymous_id, previous_id, timestamp, payload"
# Unrouted events in routing order, but those of customers the router holds back: a held
# customer's later events wait behind its held one (identity values, as `ids` of the events).
_SELECT_UNROUTED = f"""
SELECT {_COLUMNS} FROM events
WHERE routed_at IS NULL AND id <> ALL($2::bigint[])
  AND (user_id IS NULL OR user_id <> ALL($3::text[]))
  AND (anonymous_id IS NULL OR anonymous_id <> ALL($4::text[]))
  AND (previous_id IS NULL OR (previous_id <> ALL($3::text[]) AND previous_id <> ALL($4::text[])))
ORDER BY timestamp, id LIMIT $1
"""
# Just those: what the router retries on its slower timer.
_SELECT_HELD = f"""
SELECT {_COLUMNS} FROM events
WHERE routed_at IS NULL AND (id = ANY($2::bigint[]) OR user_id = ANY($3::text[])
  OR anonymous_id = ANY($4::text[]) OR previous_id = ANY($3::text[])
  OR previous_id = ANY($4::text[]))
ORDER BY timestamp, id LIMIT $1
"""


@dataclass(frozen=True)
class Held:
    """Events the router holds back: by id, and by the identity values of their customers."""

    ids: Collection[int] = ()
    users: Collection[str] = ()
    anons: Collection[str] = ()

    def __bool__(self) -> bool:
        return bool(self.ids or self.users or self.anons)


async def select_unrouted(
    conn: asyncpg.Connection, limit: int, held: Held = Held()
) -> list[asyncpg.Record]:
    """The next `limit` events to route, oldest first, leaving out those `held` matches."""
    return await conn.fetch(
        _SELECT_UNROUTED, limit, list(held.ids), list(held.users), list(held.anons)
    )


async def select_held(conn: asyncpg.Connection, limit: int, held: Held) -> list[asyncpg.Record]:
    """The unrouted events `held` matches, oldest first (the complement of `select_unrouted`)."""
    if not held:
        return []
    return await conn.fetch(_SELECT_HELD, limit, list(held.ids), list(held.users), list(held.anons))


async def customer_identities(
    conn: asyncpg.Connection, users: Collection[str], anons: Collection[str]
) -> dict[tuple[str, str], set[tuple[str, str]]]:
    """For each known user / anonymous id given: every user and anonymous id of its customer
    (what holding that customer back has to match)."""
    out: dict[tuple[str, str], set[tuple[str, str]]] = {}
    if not users and not anons:
        return out
    for r in await conn.fetch(
        "SELECT k.kind AS k_kind, k.value AS k_value, j.kind, j.value FROM identities k "
        "JOIN identities j ON j.customer_id = k.customer_id AND j.kind IN ('user', 'anonymous') "
        "WHERE (k.kind = 'user' AND k.value = ANY($1::text[])) "
        "OR (k.kind = 'anonymous' AND k.value = ANY($2::text[]))",
        list(users),
        list(anons),
    ):
        out.setdefault((r["k_kind"], r["k_value"]), set()).add((r["kind"], r["value"]))
    return out


_INSERT = """
INSERT INTO events (message_id, type, event, user_id, anonymous_id, previous_id, timestamp, payload)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::timestamptz[], $8::jsonb[])
ON CONFLICT (message_id) DO NOTHING
"""


async def store_events(pool: asyncpg.Pool, rows: list[dict[str, Any]]) -> int:
    """Insert a batch in one transaction (duplicates by messageId are skipped); wake the router.

    Returns how many were new. When this returns, the events are committed: that is the
    moment the API may answer 200.
    """
    async with pool.acquire() as conn, conn.transaction():
        return await insert_events(conn, rows)


async def insert_events(conn: asyncpg.Connection, rows: list[dict[str, Any]]) -> int:
    """The insert of `store_events` inside the caller's transaction (the router is woken when
    it commits). Returns how many were new."""
    cols: list[list[Any]] = [[] for _ in range(8)]
    for r in rows:
        for i, key in enumerate(
            ("message_id", "type", "event", "user_id", "anonymous_id", "previous_id")
        ):
            cols[i].append(r.get(key))
        ts: datetime = r["timestamp"]
        cols[6].append(ts)
        cols[7].append(r["payload"])
    status = await conn.execute(_INSERT, *cols)
    await conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
    return int(status.split()[-1])


async def dead_letter(
    conn: asyncpg.Connection, event_id: int, message_id: str, error: BaseException, failures: int
) -> None:
    """Set an event aside: out of the outbox, with its error, until it is replayed.

    A replayed event that fails again reopens its row (one row per event)."""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO dead_letters (event_id, message_id, error, error_type, failures, status) "
            "VALUES ($1, $2, $3, $4, $5, 'open') ON CONFLICT (event_id) DO UPDATE SET "
            "status = 'open', error = EXCLUDED.error, error_type = EXCLUDED.error_type, "
            "failures = dead_letters.failures + EXCLUDED.failures, updated_at = now()",
            event_id,
            message_id,
            (str(error) or repr(error))[:4000],
            type(error).__name__[:128],
            failures,
        )
        await conn.execute("UPDATE events SET routed_at = now() WHERE id = $1", event_id)


async def replay_dead_letter(conn: asyncpg.Connection, letter_id: int) -> bool:
    """Put a dead letter's event back in the outbox; False if the letter is not open."""
    async with conn.transaction():
        event_id = await conn.fetchval(
            "UPDATE dead_letters SET status = 'replayed', replayed_at = now(), updated_at = now() "
            "WHERE id = $1 AND status = 'open' RETURNING event_id",
            letter_id,
        )
        if event_id is None:
            return False
        await conn.execute("UPDATE events SET routed_at = NULL WHERE id = $1", event_id)
        await conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
    return True
