"""Once the API has answered 200, the event is never lost, and a send never happens twice:
not with the worker down or killed, not with the API killed right after answering, not with
PostgreSQL stopped and restarted under the worker."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest

from core.embedded import start_postgres
from store.db import create_pool, migrate
from tests.conftest import eventually
from tests.e2e.conftest import WRITE_KEY, Stack, admin

GREET = {
    "id": "greet",
    "name": "Greeting",
    "entry": {"type": "track", "event": "Signed Up"},
    "steps": [
        {"id": "hello", "kind": "send", "template": {"body": "Hello {{ event.properties.n }}"}},
        {"id": "linger", "kind": "wait", "duration": "1h"},
    ],
}
N = 60


def _batch(prefix: str, n: int = N) -> dict:
    return {
        "batch": [
            {
                "type": "track",
                "userId": f"{prefix}-{i}",
                "event": "Signed Up",
                "properties": {"n": i},
                "messageId": f"{prefix}-msg-{i}",
            }
            for i in range(n)
        ]
    }


async def _post(stack: Stack, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.api_url, auth=(WRITE_KEY, "")) as api:
        return await api.post("/v1/batch", json=body)


async def _publish(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url) as api:
        r = await api.post("/v1/journeys", json=GREET, headers=admin())
        assert r.status_code == 200, r.text


async def _exactly_one_message_each(pool, prefix: str, n: int = N) -> None:
    async def all_sent() -> bool:
        return await pool.fetchval("SELECT count(*) FROM messages") >= n

    await eventually(all_sent, within=60, what=f"{n} messages")
    rows = await pool.fetch(
        "SELECT i.value AS user_id, count(m.id) AS n, min(m.body) AS body FROM identities i "
        "JOIN messages m ON m.customer_id = i.customer_id WHERE i.kind = 'user' GROUP BY 1"
    )
    got = {r["user_id"]: (r["n"], r["body"]) for r in rows}
    assert got == {f"{prefix}-{i}": (1, f"Hello {i}") for i in range(n)}
    assert await pool.fetchval("SELECT count(*) FROM events WHERE routed_at IS NULL") == 0


async def test_events_wait_for_a_worker_that_is_down(stack: Stack, db):
    stack.start_api()
    await _publish(stack)
    r = await _post(stack, _batch("down"))
    assert r.status_code == 200
    assert await db.fetchval("SELECT count(*) FROM events WHERE routed_at IS NULL") == N
    stack.start_worker()
    await _exactly_one_message_each(db, "down")


async def test_worker_killed_mid_batch_then_restarted(stack: Stack, db):
    stack.start_api()
    stack.start_worker()
    await _publish(stack)
    assert (await _post(stack, _batch("kill"))).status_code == 200

    async def some_sent() -> bool:
        return await db.fetchval("SELECT count(*) FROM messages") > 0

    await eventually(some_sent, what="the first sends")
    stack.kill("worker")  # SIGKILL in the middle of routing / sending
    stack.start_worker()
    await _exactly_one_message_each(db, "kill")


async def test_api_killed_right_after_answering(stack: Stack, db):
    stack.start_api()
    await _publish(stack)
    r = await _post(stack, _batch("api"))
    assert r.status_code == 200
    stack.kill("api")
    stack.start_worker()
    await _exactly_one_message_each(db, "api")


@pytest.fixture
async def own_postgres():
    """A PostgreSQL of this test's own, so stopping it does not disturb other tests."""
    server, url = start_postgres(Path(tempfile.mkdtemp(prefix="journeys-pgdown-")) / "pg")
    await migrate(url)
    pool = await create_pool(url)
    yield server, url, pool
    await pool.close()
    server.cleanup()


async def test_postgres_stopped_and_restarted_under_the_worker(own_postgres, dev_env):
    server, url, pool = own_postgres
    stack = Stack(url, dev_env.client.service_client.config.target_host)
    try:
        stack.start_api()
        stack.start_worker()
        await _publish(stack)
        assert (await _post(stack, _batch("pg"))).status_code == 200
        server.stop()
        # While storage is down the API refuses (503) rather than pretending to accept.
        r = await _post(stack, _batch("refused", 1))
        assert r.status_code == 503
        assert r.json()["code"] == "unavailable"
        server.ensure_postgres_running()
        await pool.expire_connections()
        await _exactly_one_message_each(pool, "pg")
        assert await pool.fetchval("SELECT count(*) FROM events") == N
    finally:
        stack.stop_all()
