"""Customers and sent messages for the feedback tests: customers go in through the event API
and the real router; message rows are inserted as the send path leaves them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
from temporalio.client import Client

from activities.router import EventRouter
from api.main import create_app
from core.settings import Settings
from store.profiles import find_customer
from tests.api.conftest import WRITE

PROVIDER_SECRET = "test-provider-secret"


def callbacks_on(settings: Settings) -> Settings:
    """The provider callbacks are off by default: these settings turn them on (their own
    secret, and an SMS channel for the SMS ones)."""
    return settings.model_copy(
        update={
            "provider_callback_secret": PROVIDER_SECRET,
            "sms_api_url": "http://sms.invalid/2010-04-01",
        }
    )


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Another app in-process, with other settings than the `api` fixture's."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def route(pool: asyncpg.Pool, client: Client) -> int:
    router = EventRouter(pool, client, task_queue=f"tq-{uuid.uuid4().hex[:8]}")
    total = 0
    while n := await router.route_once():
        total += n
    return total


async def customer(
    api: httpx.AsyncClient, pool: asyncpg.Pool, client: Client, user: str, **traits: Any
) -> str:
    r = await api.post("/v1/identify", json={"userId": user, "traits": traits}, auth=WRITE)
    assert r.status_code == 200, r.text
    await route(pool, client)
    cid = await find_customer(pool, user)
    assert cid is not None
    return cid


async def message(pool: asyncpg.Pool, customer_id: str, **cols: Any) -> int:
    row: dict[str, Any] = {
        "idempotency_key": f"k-{uuid.uuid4()}",
        "customer_id": customer_id,
        "journey_id": "welcome",
        "step_id": "greet",
        "channel": "email",
        "status": "sent",
        "body": "hello",
        **cols,
    }
    names = ", ".join(row)
    params = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    return await pool.fetchval(
        f"INSERT INTO messages ({names}) VALUES ({params}) RETURNING id", *row.values()
    )


async def events(pool: asyncpg.Pool, name: str) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM events WHERE event = $1 ORDER BY id", name)


def assert_error(r: httpx.Response, status: int, code: str, field: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message"} and body["code"] == code, body
    assert field in body["message"], body
