"""Stored message templates: one row per template, immutable numbered versions."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class TemplateContent:
    template_id: str
    version: int
    channel: str
    subject: str | None
    body: str
    html: str | None


async def get_version(
    conn: asyncpg.Pool | asyncpg.Connection, template_id: str, version: int | None = None
) -> TemplateContent | None:
    """One version (the current one when `version` is None); None if there is no such thing."""
    row = await conn.fetchrow(
        "SELECT v.template_id, v.version, t.channel, v.subject, v.body, v.html "
        "FROM template_versions v JOIN templates t ON t.id = v.template_id "
        "WHERE v.template_id = $1 AND v.version = coalesce($2, t.current_version)",
        template_id,
        version,
    )
    return TemplateContent(**dict(row)) if row else None
