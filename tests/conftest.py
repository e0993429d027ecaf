"""Real PostgreSQL (embedded) and real Temporal servers for the whole suite.

- `pg_url`: one embedded PostgreSQL per session, migrated; `db` truncates it per test.
- `ts_env`: the time-skipping test server (weeks of timers in milliseconds).
- `dev_env`: the Temporal dev server with our search attributes (for search attribute,
  query and end-to-end tests).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from core.embedded import find_binary, start_postgres
from core.logs import configure_logging
from core.settings import ROOT
from core.temporal import SEARCH_ATTRIBUTES, register_search_attributes
from store.db import create_pool, migrate_sync

T = TypeVar("T")
# Fixtures: `receiver` (a local HTTP endpoint), `smtp` (a local SMTP server).
pytest_plugins = ["tests.receiver", "tests.smtp", "tests.providers"]
TABLES = (
    "events, identities, customers, messages, journey_runs, journey_versions, journeys, "
    "applied_effects, tasks, launches, subscriptions, suppressions, template_versions, templates, "
    "send_rate_windows, api_keys, audit_log, dead_letters, erasures, entry_skips"
)

# The suite runs with the built-in development secrets (core.settings.require_secrets), and so
# do the API and worker processes it starts (they inherit this environment).
os.environ["JOURNEYS_ENV"] = "test"
configure_logging("console", os.environ.get("TEST_LOG_LEVEL", "WARNING"))


@pytest.fixture(scope="session")
def pg_url() -> Any:
    tmp = Path(tempfile.mkdtemp(prefix="journeys-pg-"))
    server, url = start_postgres(tmp / "pgdata")
    migrate_sync(url)
    yield url
    server.cleanup()


@pytest.fixture(scope="session")
async def pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(pg_url, max_size=20)
    yield p
    await p.close()


@pytest.fixture
async def db(pool: asyncpg.Pool) -> asyncpg.Pool:
    await pool.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    return pool


@pytest.fixture(scope="session")
async def ts_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=find_binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    await register_search_attributes(env.client)
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal"),
        data_converter=pydantic_data_converter,
        search_attributes=SEARCH_ATTRIBUTES,
    )
    yield env
    await env.shutdown()


async def eventually(
    check: Callable[[], Awaitable[T]], *, within: float = 20.0, what: str = "condition"
) -> T:
    """Wait for a condition that another process makes true (polls; fails with `what`)."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


JOURNEYS_DIR = ROOT / "journeys"


@pytest.fixture
async def desk(db, pg_url: str, dev_env: WorkflowEnvironment) -> AsyncIterator[Any]:
    """(engine, api): an in-process engine on the dev server and the API on its task queue."""
    from tests.harness import admin_api, engine

    async with engine(db, dev_env) as eng, admin_api(eng, pg_url) as api:
        yield eng, api
