"""Storing accepted events: the durable hand-off between the API and everything else."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

NOTIFY_CHANNEL = "events_ingested"

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
