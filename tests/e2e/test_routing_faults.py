"""The router under faults: a failed journey load, events handed back late, a merge racing a
send, and events that can never be routed (dev server, in-process engine)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from temporalio.service import RPCError, RPCStatusCode

import activities.router as router_module
import store.profiles as profiles_module
from activities.contact_policy import ContactPolicy
from activities.journey_activities import JourneyActivities
from models.segment import parse_event
from tests.conftest import eventually
from tests.harness import Engine, engine, identify, track

GREETER = {
    "id": "greeter",
    "name": "Greeter",
    "entry": {"event": "Started"},
    "steps": [{"id": "hi", "kind": "send", "template": {"body": "hi"}}],
}


@pytest.fixture
async def eng(db, dev_env) -> Any:
    async with engine(db, dev_env) as e:
        await e.publish(GREETER)
        yield e


async def _greeted(eng: Engine, user: str) -> bool:
    cid = await eng.pool.fetchval(
        "SELECT customer_id FROM identities WHERE kind = 'user' AND value = $1", user
    )
    if cid is None:
        return False
    return bool(
        await eng.pool.fetchval(
            "SELECT count(*) FROM messages WHERE customer_id = $1 AND body = 'hi'", cid
        )
    )


async def _route_all(eng: Engine) -> int:
    routed = 0
    while n := await eng.router.route_once():
        routed += n
    return routed


# -- 2: the journeys-stale flag ------------------------------------------------------------


async def test_a_failed_journey_load_is_retried_before_routing(eng, monkeypatch):
    real = router_module.routed_journeys
    calls = 0

    async def flaky(conn: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.exceptions.QueryCanceledError("canceled by a test")
        return await real(conn)

    monkeypatch.setattr(router_module, "routed_journeys", flaky)
    eng.router.journeys_changed()
    with pytest.raises(asyncpg.exceptions.QueryCanceledError):
        await eng.send(identify("st1"), track("st1", "Started"))
    assert await _route_all(eng) == 2  # the next round loads the journeys, then routes
    await eventually(lambda: _greeted(eng, "st1"), what="st1 greeted")
    assert calls == 2


# -- 4: events handed back by a finished run ------------------------------------------------


async def test_an_event_handed_back_does_not_roll_back_newer_traits(eng):
    old = identify("tr1", plan="free", email="old@example.com")
    old["timestamp"] = "2026-01-01T00:00:00Z"
    new = identify("tr1", plan="pro")
    new["timestamp"] = "2026-06-01T00:00:00Z"
    await eng.send(old)
    await eng.send(new)
    cid = await eng.customer("tr1")
    traits = await eng.pool.fetchval("SELECT traits FROM customers WHERE id = $1", cid)
    assert traits == {"plan": "pro", "email": "old@example.com"}
    # A finished run hands the old identify back (it did not use it): routed again.
    await JourneyActivities(eng.pool).release_events([old["messageId"]])
    assert await _route_all(eng) == 1
    traits = await eng.pool.fetchval("SELECT traits FROM customers WHERE id = $1", cid)
    assert traits == {"plan": "pro", "email": "old@example.com"}


# -- 5: a merge takes the contact-policy lock of both customers ----------------------------


async def test_a_merge_waits_for_a_send_holding_the_contact_lock(eng):
    await eng.send(identify("lk1"))
    await eng.send({"type": "track", "anonymousId": "anon-lk1", "event": "Seen",
                    "messageId": f"m-{uuid.uuid4()}"})  # fmt: skip
    loser = await eng.customer("anon-lk1")
    survivor = await eng.customer("lk1")
    await store_only(eng, {"type": "identify", "userId": "lk1", "anonymousId": "anon-lk1",
                           "messageId": f"m-{uuid.uuid4()}"})  # fmt: skip
    async with eng.pool.acquire() as conn, conn.transaction():
        # What a send to the merged-away customer holds while it checks the caps.
        await ContactPolicy([]).lock(conn, loser)
        routing = asyncio.create_task(_route_all(eng))

        async def merge_waits() -> bool:
            return bool(
                await eng.pool.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
            )

        await eventually(merge_waits, within=10, what="the merge waiting for the lock")
        assert not routing.done()
        assert await eng.customer("anon-lk1") == loser  # not merged while the send decides
    assert await asyncio.wait_for(routing, timeout=30) == 1
    assert await eng.customer("anon-lk1") == survivor


async def store_only(eng: Engine, *events: dict[str, Any]) -> None:
    from store.events import store_events

    await store_events(eng.pool, [parse_event(e).model_dump() for e in events])


# -- 6: poison events go to dead letters; everything else flows ----------------------------


async def insert_raw(eng: Engine, event: dict[str, Any], timestamp_sql: str) -> int:
    """Store an event straight into the table, with a timestamp the API would not take."""
    row = parse_event(event).model_dump()
    return await eng.pool.fetchval(
        "INSERT INTO events (message_id, type, event, user_id, anonymous_id, timestamp, "
        f"payload) VALUES ($1, $2, $3, $4, $5, {timestamp_sql}, $6) RETURNING id",
        row["message_id"],
        row["type"],
        row["event"],
        row["user_id"],
        row["anonymous_id"],
        row["payload"],
    )


async def dead_letters(eng: Engine) -> list[asyncpg.Record]:
    return await eng.pool.fetch("SELECT * FROM dead_letters ORDER BY event_id")


async def test_infinite_timestamps_are_set_aside_and_the_rest_flows(eng):
    bad1 = await insert_raw(eng, track("p-1", "Started"), "'-infinity'")
    bad2 = await insert_raw(eng, identify("p-2", plan="x"), "'infinity'")
    good = [f"g-{i}" for i in range(5)]
    await eng.send(*[e for u in good for e in (identify(u), track(u, "Started"))])
    for u in good:
        await eventually(lambda u=u: _greeted(eng, u), what=f"{u} greeted")
    letters = await dead_letters(eng)
    assert [r["event_id"] for r in letters] == [bad1, bad2]
    assert all("timestamp" in r["error"] for r in letters)
    assert all(r["status"] == "open" for r in letters)
    # They are not selected again: nothing is left to route.
    assert await eng.router.route_once() == 0


async def test_an_event_failing_deterministically_is_isolated_by_bisection(eng, monkeypatch):
    real = profiles_module.valid_timezone

    def broken(name: object) -> bool:
        if name == "Broken/Zone":
            raise ValueError("timezone: cannot handle Broken/Zone")
        return real(name)

    monkeypatch.setattr(profiles_module, "valid_timezone", broken)
    bad = identify("b-1", timezone="Broken/Zone")
    users = [f"h-{i}" for i in range(6)]
    events = [e for u in users for e in (identify(u), track(u, "Started"))]
    events.insert(5, bad)
    await eng.send(*events)
    for u in users:
        await eventually(lambda u=u: _greeted(eng, u), what=f"{u} greeted")
    (letter,) = await dead_letters(eng)
    assert letter["message_id"] == bad["messageId"]
    assert "cannot handle Broken/Zone" in letter["error"]
    assert letter["failures"] >= 2  # it failed again on its own before it was set aside


OUTAGES = [
    ConnectionResetError("the database went away"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    RPCError("Temporal unavailable", RPCStatusCode.UNAVAILABLE, b""),
]


@pytest.mark.parametrize("error", OUTAGES, ids=lambda e: type(e).__name__)
async def test_transient_errors_do_not_dead_letter(eng, monkeypatch, error):
    real = router_module.EventRouter._execute
    calls = 0

    async def outage(self: Any, plan: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise error
        return await real(self, plan)

    monkeypatch.setattr(router_module.EventRouter, "_execute", outage)
    for _ in range(3):
        with pytest.raises(type(error)):
            await eng.send(identify("tt1"), track("tt1", "Started"))
    assert await _route_all(eng) == 6  # three tries stored two events each; none is lost
    await eventually(lambda: _greeted(eng, "tt1"), what="tt1 greeted")
    assert await dead_letters(eng) == []
