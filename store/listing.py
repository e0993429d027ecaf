"""Read-only, paged look-ups over runs, customers and launches (the list endpoints).

Every list is keyset-paged, newest first: a page ends with an opaque cursor naming its last
row's sort key, and the next page starts strictly after it. Unlike OFFSET paging, a page costs
the same however deep it is, and rows written meanwhile never shift a page (no duplicates, no
gaps). Nothing here writes: the owners of these tables are store.journeys / activities
(journey_runs), store.profiles (customers, identities) and api.routes.launches (launches).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

# Statuses of a run that has a live workflow (the router signals these).
LIVE_RUN_STATUSES = ("starting", "running")


class BadCursor(ValueError):
    """A cursor that this module did not issue (or that was altered)."""


@dataclass(frozen=True)
class Page:
    rows: list[asyncpg.Record]
    next_cursor: str | None


def encode_cursor(*key: Any) -> str:
    """An opaque, URL-safe cursor for a sort key (datetimes as ISO strings)."""
    parts = [k.isoformat() if isinstance(k, datetime) else k for k in key]
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, *kinds: type) -> tuple[Any, ...]:
    """The sort key of a cursor made by `encode_cursor`, checked against `kinds`
    (datetime or str); anything else is a `BadCursor`."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        parts = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise BadCursor("not a cursor from a previous page") from None
    if not isinstance(parts, list) or len(parts) != len(kinds):
        raise BadCursor("not a cursor from a previous page")
    out: list[Any] = []
    for value, kind in zip(parts, kinds, strict=True):
        if not isinstance(value, str) or "\x00" in value:
            raise BadCursor("not a cursor from a previous page")
        if kind is datetime:
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                raise BadCursor("not a cursor from a previous page") from None
            if parsed.tzinfo is None:
                raise BadCursor("not a cursor from a previous page")
            out.append(parsed)
        else:
            out.append(value)
    return tuple(out)


async def _page(
    pool: asyncpg.Pool, sql: str, args: list[Any], limit: int, key: tuple[str, ...]
) -> Page:
    rows = await pool.fetch(sql + f" LIMIT ${len(args) + 1}", *args, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = encode_cursor(*(rows[-1][k] for k in key)) if more and rows else None
    return Page(rows, cursor)


async def journey_runs(
    pool: asyncpg.Pool,
    journey_id: str,
    *,
    limit: int,
    cursor: str | None = None,
    status: str | None = None,
    version: int | None = None,
    workflow_ids: list[str] | None = None,
) -> Page:
    """A journey's enrollments, newest first. `workflow_ids` (from Temporal visibility, for a
    step filter) keeps only the live runs of those workflows: only a live run has a step."""
    where = ["journey_id = $1"]
    args: list[Any] = [journey_id]
    if status is not None:
        args.append(status)
        where.append(f"status = ${len(args)}")
    if version is not None:
        args.append(version)
        where.append(f"journey_version = ${len(args)}")
    if workflow_ids is not None:
        args.append(workflow_ids)
        where.append(f"workflow_id = ANY(${len(args)}::text[])")
        args.append(list(LIVE_RUN_STATUSES))
        where.append(f"status = ANY(${len(args)}::text[])")
    if cursor is not None:
        started_at, enrollment_id = decode_cursor(cursor, datetime, str)
        args += [started_at, enrollment_id]
        where.append(f"(started_at, enrollment_id) < (${len(args) - 1}, ${len(args)})")
    sql = (
        "SELECT enrollment_id, workflow_id, run_id, journey_id, journey_version, customer_id, "
        "status, exit_reason, started_at, ended_at, goal_at, run_key, arm, holdout "
        f"FROM journey_runs WHERE {' AND '.join(where)} "
        "ORDER BY started_at DESC, enrollment_id DESC"
    )
    return await _page(pool, sql, args, limit, ("started_at", "enrollment_id"))


async def customers(
    pool: asyncpg.Pool,
    *,
    limit: int,
    cursor: str | None = None,
    user_id: str | None = None,
    email: str | None = None,
    traits: dict[str, str] | None = None,
) -> Page:
    """Customers (merged-away ids left out), newest first, with their identities.

    A trait matches on its text form (`traits->>'plan' = 'pro'`; numbers and booleans as JSON
    writes them: `42`, `true`); emails match case-insensitively, as they are stored lowered."""
    where = ["c.merged_into IS NULL"]
    args: list[Any] = []
    if user_id is not None:
        args.append(user_id)
        where.append(
            "EXISTS (SELECT 1 FROM identities i WHERE i.customer_id = c.id "
            f"AND i.kind = 'user' AND i.value = ${len(args)})"
        )
    if email is not None:
        args.append(email)
        where.append(
            "EXISTS (SELECT 1 FROM identities i WHERE i.customer_id = c.id "
            f"AND i.kind = 'email' AND i.value = lower(${len(args)}))"
        )
    for name, value in (traits or {}).items():
        args += [name, value]
        where.append(f"c.traits->>${len(args) - 1} = ${len(args)}")
    if cursor is not None:
        created_at, cid = decode_cursor(cursor, datetime, str)
        args += [created_at, cid]
        where.append(f"(c.created_at, c.id) < (${len(args) - 1}, ${len(args)})")
    sql = (
        "SELECT c.id, c.traits, c.timezone, c.created_at, c.updated_at, "
        "coalesce((SELECT jsonb_agg(jsonb_build_object('kind', i.kind, 'value', i.value) "
        "ORDER BY i.kind, i.value) FROM identities i WHERE i.customer_id = c.id), '[]') "
        "AS identities "
        f"FROM customers c WHERE {' AND '.join(where)} ORDER BY c.created_at DESC, c.id DESC"
    )
    return await _page(pool, sql, args, limit, ("created_at", "id"))


async def launches(
    pool: asyncpg.Pool,
    *,
    limit: int,
    cursor: str | None = None,
    journey_id: str | None = None,
    status: str | None = None,
) -> Page:
    """Audience launches, newest first (their figures as last recorded, page by page)."""
    where = ["TRUE"]
    args: list[Any] = []
    if journey_id is not None:
        args.append(journey_id)
        where.append(f"journey_id = ${len(args)}")
    if status is not None:
        args.append(status)
        where.append(f"status = ${len(args)}")
    if cursor is not None:
        created_at, launch_id = decode_cursor(cursor, datetime, str)
        args += [created_at, launch_id]
        where.append(f"(created_at, id) < (${len(args) - 1}, ${len(args)})")
    sql = (
        "SELECT id, journey_id, status, enrolled, skipped, cursor, rate_per_second, page_size, "
        f"created_at, finished_at FROM launches WHERE {' AND '.join(where)} "
        "ORDER BY created_at DESC, id DESC"
    )
    return await _page(pool, sql, args, limit, ("created_at", "id"))


async def oldest_unrouted(pool: asyncpg.Pool) -> tuple[int, float | None]:
    """Router lag: how many events wait in the outbox, and the age in seconds of the oldest
    (by arrival: an event's own `timestamp` may be days old when it arrives)."""
    row = await pool.fetchrow(
        "SELECT count(*) AS n, extract(epoch FROM now() - min(received_at))::float8 AS age "
        "FROM events WHERE routed_at IS NULL"
    )
    assert row is not None
    return row["n"], row["age"]
