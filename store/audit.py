"""The audit log: every management action, who did it, on what, and how it ended.

Append-only: this module only inserts and reads, and a trigger (migration 0011) refuses UPDATE
and DELETE on `audit_log` for any caller. `api.access.AccessMiddleware` writes one entry per
non-GET request on manage/operate/admin routes; `store.api_keys` writes one per key created or
revoked, in the key's own transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel

Versioned = Literal["journeys", "templates"]


class AuditEntryPublic(BaseModel):
    id: int
    at: datetime
    key_id: str
    action: str
    target: dict[str, Any]
    status: int | None
    before_version: int | None
    after_version: int | None
    detail: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditEntryPublic]
    next_before: int | None


async def append(
    conn: asyncpg.Pool | asyncpg.Connection,
    *,
    key_id: str,
    action: str,
    target: dict[str, Any],
    status: int | None = None,
    before_version: int | None = None,
    after_version: int | None = None,
    detail: dict[str, Any] | None = None,
) -> int:
    return await conn.fetchval(
        """
        INSERT INTO audit_log (key_id, action, target, status, before_version, after_version,
                               detail)
        VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id
        """,
        key_id,
        action,
        target,
        status,
        before_version,
        after_version,
        detail or {},
    )


async def page(
    pool: asyncpg.Pool,
    *,
    limit: int,
    before: int | None = None,
    action: str | None = None,
    target: str | None = None,
    key_id: str | None = None,
) -> AuditPage:
    """Newest first. `target` matches any value of the entry's target (a journey id, a key id)."""
    rows = await pool.fetch(
        """
        SELECT * FROM audit_log
        WHERE ($1::bigint IS NULL OR id < $1)
          AND ($2::text IS NULL OR action = $2)
          AND ($3::text IS NULL OR EXISTS (SELECT 1 FROM jsonb_each_text(target) t
                                           WHERE t.value = $3))
          AND ($4::text IS NULL OR key_id = $4)
        ORDER BY id DESC
        LIMIT $5
        """,
        before,
        action,
        target,
        key_id,
        limit + 1,
    )
    items = [AuditEntryPublic(**dict(r)) for r in rows[:limit]]
    return AuditPage(items=items, next_before=items[-1].id if len(rows) > limit else None)


async def current_version(pool: asyncpg.Pool, kind: Versioned, thing_id: str) -> int | None:
    """The current version of a journey or template (None = none yet), for before/after."""
    table = {"journeys": "journeys", "templates": "templates"}[kind]
    return await pool.fetchval(f"SELECT current_version FROM {table} WHERE id = $1", thing_id)
