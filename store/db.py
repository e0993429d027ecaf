"""Connection pool and migrations."""

from __future__ import annotations

import asyncio
import json

import asyncpg
from alembic import command
from alembic.config import Config

from core.settings import ROOT, asyncpg_dsn


async def _init(conn: asyncpg.Connection) -> None:
    for typ in ("jsonb", "json"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(url: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        asyncpg_dsn(url), min_size=min_size, max_size=max_size, init=_init
    )
    assert pool is not None
    return pool


def migrate_sync(url: str) -> None:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["url"] = url
    command.upgrade(cfg, "head")


async def migrate(url: str) -> None:
    """Alembic's env runs its own event loop, so it gets a thread."""
    await asyncio.to_thread(migrate_sync, url)
