"""The FastAPI app in-process (httpx ASGI transport) over the session's Postgres and dev server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from core.settings import Settings

WRITE_KEY = "test-write-key"
ADMIN_KEY = "test-admin-key"


@pytest.fixture
async def settings(pg_url: str, dev_env: WorkflowEnvironment) -> Settings:
    config = dev_env.client.service_client.config
    return Settings(
        database_url=pg_url,
        temporal_address=config.target_host,
        journeys_write_key=f"{WRITE_KEY},second-key",
        journeys_admin_key=ADMIN_KEY,
        log_format="console",
    )


@pytest.fixture
async def api(db, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Unauthenticated client; tests add auth per request. Depends on `db` (clean tables)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


WRITE = httpx.BasicAuth(WRITE_KEY, "")
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
