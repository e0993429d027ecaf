"""Stored message templates: one row per template, immutable numbered versions.

Writing content is checked the way a journey's inline templates are checked at publish
(`models.validation.check_template_sources`): it parses and reads only the variables a send
provides. A new version never changes an old one: a published journey pins the version it was
published with, so its runs render exactly that content.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import get_args

import asyncpg

from models.journey import ChannelName
from models.validation import check_template_sources

CHANNELS: tuple[str, ...] = get_args(ChannelName)


class TemplateNotFound(LookupError):
    """No template (or no such version of it)."""


class TemplateExists(ValueError):
    """A template with this id already exists: add a version instead."""


class InvalidTemplate(ValueError):
    """Content that would fail at send time; the message starts with the field."""


@dataclass(frozen=True)
class TemplateContent:
    template_id: str
    version: int
    channel: str
    subject: str | None
    body: str
    html: str | None
    created_at: datetime | None = None


@dataclass(frozen=True)
class StoredTemplate:
    id: str
    name: str
    channel: str
    current_version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class TemplateVersionInfo:
    version: int
    created_at: datetime


_CONTENT = (
    "SELECT v.template_id, v.version, t.channel, v.subject, v.body, v.html, v.created_at "
    "FROM template_versions v JOIN templates t ON t.id = v.template_id "
)
_TEMPLATE = "SELECT id, name, channel, current_version, created_at, updated_at FROM templates "


def check_content(*, subject: str | None, body: str, html: str | None) -> None:
    """Raises InvalidTemplate (`body: unknown template variable 'user' ...`)."""
    try:
        check_template_sources([("subject", subject), ("body", body), ("html", html)])
    except ValueError as err:
        raise InvalidTemplate(str(err)) from None


async def create_template(
    conn: asyncpg.Connection,
    template_id: str,
    *,
    channel: str,
    body: str,
    subject: str | None = None,
    html: str | None = None,
    name: str | None = None,
) -> TemplateContent:
    """A new template with its first version.

    Raises:
        InvalidTemplate: the content does not parse or reads unknown variables.
        TemplateExists: the id is taken.
    """
    if channel not in CHANNELS:
        raise InvalidTemplate(f"channel: {channel!r} is not one of {', '.join(CHANNELS)}")
    check_content(subject=subject, body=body, html=html)
    async with conn.transaction():
        created = await conn.fetchval(
            "INSERT INTO templates (id, name, channel, current_version) VALUES ($1, $2, $3, 1) "
            "ON CONFLICT (id) DO NOTHING RETURNING id",
            template_id,
            name or template_id,
            channel,
        )
        if created is None:
            raise TemplateExists(f"template {template_id!r} already exists")
        await conn.execute(
            "INSERT INTO template_versions (template_id, version, subject, body, html) "
            "VALUES ($1, 1, $2, $3, $4)",
            template_id,
            subject,
            body,
            html,
        )
        found = await get_version(conn, template_id, 1)
    assert found is not None
    return found


async def add_version(
    conn: asyncpg.Connection,
    template_id: str,
    *,
    body: str,
    subject: str | None = None,
    html: str | None = None,
    name: str | None = None,
) -> TemplateContent:
    """The content as a new current version; content equal to the current version's is not a
    new version (the current one is returned). `name`, when given, renames the template.

    Raises:
        InvalidTemplate: the content does not parse or reads unknown variables.
        TemplateNotFound: no template with this id.
    """
    check_content(subject=subject, body=body, html=html)
    async with conn.transaction():
        # The row lock orders concurrent updates of one template.
        current = await conn.fetchval(
            "SELECT current_version FROM templates WHERE id = $1 FOR UPDATE", template_id
        )
        if current is None:
            raise TemplateNotFound(f"no template {template_id!r}")
        latest = await get_version(conn, template_id, current)
        assert latest is not None
        unchanged = (latest.subject, latest.body, latest.html) == (subject, body, html)
        if unchanged and name is None:
            return latest
        version = current if unchanged else current + 1
        if not unchanged:
            await conn.execute(
                "INSERT INTO template_versions (template_id, version, subject, body, html) "
                "VALUES ($1, $2, $3, $4, $5)",
                template_id,
                version,
                subject,
                body,
                html,
            )
        await conn.execute(
            "UPDATE templates SET current_version = $2, name = coalesce($3, name), "
            "updated_at = now() WHERE id = $1",
            template_id,
            version,
            name,
        )
        found = await get_version(conn, template_id, version)
    assert found is not None
    return found


async def list_templates(conn: asyncpg.Pool | asyncpg.Connection) -> list[StoredTemplate]:
    return [StoredTemplate(**dict(r)) for r in await conn.fetch(_TEMPLATE + "ORDER BY id")]


async def get_template(
    conn: asyncpg.Pool | asyncpg.Connection, template_id: str
) -> StoredTemplate | None:
    row = await conn.fetchrow(_TEMPLATE + "WHERE id = $1", template_id)
    return StoredTemplate(**dict(row)) if row else None


async def list_versions(
    conn: asyncpg.Pool | asyncpg.Connection, template_id: str
) -> list[TemplateVersionInfo]:
    """Every version of a template, oldest first (empty when there is no such template)."""
    rows = await conn.fetch(
        "SELECT version, created_at FROM template_versions WHERE template_id = $1 ORDER BY version",
        template_id,
    )
    return [TemplateVersionInfo(**dict(r)) for r in rows]


async def get_version(
    conn: asyncpg.Pool | asyncpg.Connection, template_id: str, version: int | None = None
) -> TemplateContent | None:
    """One version (the current one when `version` is None); None if there is no such thing."""
    row = await conn.fetchrow(
        _CONTENT + "WHERE v.template_id = $1 AND v.version = coalesce($2, t.current_version)",
        template_id,
        version,
    )
    return TemplateContent(**dict(row)) if row else None
