"""A journey engine in the test process: real Postgres, a real Temporal server, the real router,
worker and activities. Events go in through the same validation and storage as the API."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.channels import Channel
from activities.contact_policy import ContactPolicy
from activities.rate_limits import RateLimits
from activities.router import EventRouter
from api.main import create_app
from core.settings import Settings
from models.journey import JourneyDefinition
from models.runtime import JourneyRunResult
from models.segment import parse_event
from store.events import store_events
from store.journeys import load_file, parse_definition, publish
from store.profiles import find_customer
from tests.conftest import JOURNEYS_DIR
from worker import build_worker
from workflows.journey import workflow_id_for


class Engine:
    def __init__(
        self, pool: asyncpg.Pool, env: WorkflowEnvironment, task_queue: str, **router: Any
    ):
        self.pool = pool
        self.env = env
        client = self.client = env.client
        self.task_queue = task_queue
        self.router = EventRouter(pool, client, task_queue=task_queue, **router)

    async def publish(self, definition: dict[str, Any] | JourneyDefinition) -> int:
        defn = (
            definition
            if isinstance(definition, JourneyDefinition)
            else parse_definition(definition)
        )
        self.router.journeys_changed()
        return await publish(self.pool, defn)

    async def publish_examples(self, *ids: str) -> dict[str, int]:
        """Publish the example journeys named (all of them when none is named)."""
        self.router.journeys_changed()
        out = {}
        for path in sorted(JOURNEYS_DIR.glob("*.yaml")):
            if not ids or path.stem in ids:
                out[path.stem] = await publish(self.pool, load_file(path))
        return out

    async def send(self, *events: dict[str, Any]) -> int:
        """Store events as the API would, then route everything pending."""
        await store_events(self.pool, [parse_event(e).model_dump() for e in events])
        routed = 0
        while n := await self.router.route_once():
            routed += n
        return routed

    async def customer(self, ref: str) -> str:
        cid = await find_customer(self.pool, ref)
        assert cid is not None, f"no customer for {ref!r}"
        return cid

    async def run(self, journey_id: str, ref: str) -> WorkflowHandle[Any, JourneyRunResult]:
        cid = await self.customer(ref)
        return self.client.get_workflow_handle(
            workflow_id_for(journey_id, cid), result_type=JourneyRunResult
        )

    async def result(self, handle: WorkflowHandle[Any, JourneyRunResult]) -> JourneyRunResult:
        """Wait for a run to finish, letting the time-skipping server jump over its timers."""
        if self.env.supports_time_skipping:
            async with self.env.time_skipping_unlocked():
                return await handle.result()
        return await handle.result()

    async def messages(self, ref: str) -> list[asyncpg.Record]:
        cid = await self.customer(ref)
        return await self.pool.fetch(
            "SELECT * FROM messages WHERE customer_id = $1 ORDER BY id", cid
        )


@asynccontextmanager
async def engine(
    pool: asyncpg.Pool,
    env: WorkflowEnvironment,
    *,
    task_queue: str | None = None,
    terminate: bool = True,
    policy: ContactPolicy | None = None,
    channels: dict[str, Channel] | None = None,
    links: tuple[str, str] | None = None,
    rates: RateLimits | None = None,
    signing_secret: str | None = None,
    **router: Any,
) -> AsyncIterator[Engine]:
    """Caps are off unless a test passes a policy (`policy=ContactPolicy([Cap...])`)."""
    eng = Engine(pool, env, task_queue or f"tq-{uuid.uuid4().hex[:8]}", **router)
    try:
        async with build_worker(
            env.client,
            pool,
            eng.task_queue,
            policy=policy,
            channels=channels,
            links=links,
            rates=rates,
            signing_secret=signing_secret,
        ):
            yield eng
    finally:
        # A run left waiting on a queue nobody polls would stop the time-skipping server
        # from skipping time for every later test.
        live = (
            "SELECT DISTINCT workflow_id FROM journey_runs WHERE status IN ('starting', 'running')"
        )
        for row in await pool.fetch(live) if terminate else []:
            with contextlib.suppress(RPCError):
                await env.client.get_workflow_handle(row["workflow_id"]).terminate("test ended")


def track(user: str, event: str, /, **props: Any) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": event, "properties": props,
            "messageId": f"m-{uuid.uuid4()}"}  # fmt: skip


def identify(user: str, **traits: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": user, "traits": traits, "messageId": f"m-{uuid.uuid4()}"}


ADMIN = {"Authorization": "Bearer admin"}


@asynccontextmanager
async def admin_api(eng: Engine, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The real API app in-process (lifespan and all) on the engine's task queue; admin key
    `admin` (see ADMIN)."""
    settings = Settings(
        database_url=database_url,
        temporal_address=eng.client.service_client.config.target_host,
        journeys_admin_key="admin",
        temporal_task_queue=eng.task_queue,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as api:
            yield api
