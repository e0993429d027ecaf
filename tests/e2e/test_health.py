"""/health tells a dead worker and a stuck outbox apart from a healthy engine.

The API runs in-process over the session's PostgreSQL and Temporal dev server; a real worker
(tests.harness.engine: journey workflows, activities, router) polls its task queue and is then
stopped. /health/live stays 200 throughout (load balancers must not drop the API for that).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from core.settings import Settings
from tests.conftest import eventually
from tests.harness import engine


@asynccontextmanager
async def _api(pg_url: str, env: WorkflowEnvironment, task_queue: str) -> AsyncIterator[Any]:
    settings = Settings(
        database_url=pg_url,
        temporal_address=env.client.service_client.config.target_host,
        journeys_admin_key="admin",
        temporal_task_queue=task_queue,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


async def _health(api: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    r = await api.get("/health")
    return r.status_code, r.json()


async def test_health_reports_the_worker_up_then_down(db, pg_url, dev_env) -> None:
    task_queue = f"health-{uuid.uuid4().hex[:8]}"
    async with _api(pg_url, dev_env, task_queue) as api:
        status, body = await _health(api)
        assert status == 503 and body["status"] == "unavailable", body
        checks = body["checks"]
        assert checks["postgres"]["ok"] and checks["temporal"]["ok"] and checks["router"]["ok"]
        assert not checks["worker"]["ok"] and task_queue in checks["worker"]["detail"]
        assert (await api.get("/health/live")).status_code == 200

        async with engine(db, dev_env, task_queue=task_queue):

            async def up() -> dict[str, Any] | None:
                status, body = await _health(api)
                return body if status == 200 else None

            body = await eventually(up, what="/health ok with a worker polling")
            assert body["status"] == "ok" and body["checks"]["worker"]["pollers"], body

        # The worker stopped (cleanly): it is reported down, not only minutes later.
        async def down() -> dict[str, Any] | None:
            status, body = await _health(api)
            return body if status == 503 else None

        body = await eventually(down, what="/health to report the stopped worker")
        worker = body["checks"]["worker"]
        assert not worker["ok"] and worker["pollers"] == [] and worker["last_poll_at"], body
        assert body["checks"]["postgres"]["ok"] and body["checks"]["temporal"]["ok"], body
        assert (await api.get("/health/live")).status_code == 200


async def test_health_reports_router_lag(db, pg_url, dev_env) -> None:
    task_queue = f"health-{uuid.uuid4().hex[:8]}"
    # An event that arrived ten minutes ago and is still in the outbox.
    await db.execute(
        "INSERT INTO events (message_id, type, event, user_id, timestamp, received_at, payload) "
        "VALUES ('m-late', 'track', 'Late', 'u1', now(), now() - interval '10 minutes', '{}')"
    )
    async with _api(pg_url, dev_env, task_queue) as api:
        status, body = await _health(api)
    router = body["checks"]["router"]
    assert status == 503 and not router["ok"], body
    assert router["unrouted"] == 1 and router["oldest_unrouted_seconds"] >= 600, body
