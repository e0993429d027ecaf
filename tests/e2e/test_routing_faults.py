"""The router under faults: a failed journey load, events handed back late, a merge racing a
send, and events that can never be routed (dev server, in-process engine)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from temporalio.client import WorkflowHandle
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


# -- a lost leader connection: one sweeper, routing goes on ---------------------------------


async def _leader_pid(eng: Engine) -> int | None:
    """The backend holding the router's leader lock (an advisory lock on a bigint key)."""
    return await eng.pool.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = $1 "
        "AND granted",
        router_module.LEADER_LOCK,
    )


def _sweepers() -> int:
    return sum(
        1
        for t in asyncio.all_tasks()
        if not t.done() and getattr(t.get_coro(), "__qualname__", "") == "EventRouter._sweep"
    )


async def test_a_lost_leader_connection_leaves_one_sweeper_and_routing_goes_on(eng):
    stop = asyncio.Event()
    running = asyncio.create_task(eng.router.run(stop))
    try:
        killed: set[int] = set()
        for _ in range(3):
            pid = await eventually(
                lambda: _new_leader(eng, killed), what="a leader holding the lock"
            )
            await eventually(lambda: _sweepers_started(), what="the leader's sweeper")
            assert await eng.pool.fetchval("SELECT pg_terminate_backend($1)", pid)
            killed.add(pid)
        await eventually(lambda: _new_leader(eng, killed), what="a leader after the kills")
        await eventually(lambda: _sweepers_started(), what="the new leader's sweeper")
        assert _sweepers() == 1
        assert eng.router.leader_pid == await _leader_pid(eng)
        await store_only(eng, identify("lc1"), track("lc1", "Started"))
        await eventually(lambda: _greeted(eng, "lc1"), what="lc1 greeted by the new leader")
        assert _sweepers() == 1
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=30)
    assert _sweepers() == 0


async def _new_leader(eng: Engine, killed: set[int]) -> int | None:
    pid = await _leader_pid(eng)
    return pid if pid is not None and pid not in killed else None


async def _sweepers_started() -> bool:
    return _sweepers() > 0


async def test_a_connection_lost_mid_chunk_does_not_hide_the_error(eng, monkeypatch):
    class RealError(Exception):
        pass

    async def dies(self: Any, conn: asyncpg.Connection) -> int:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        await eng.pool.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        await asyncio.wait_for(lost.wait(), timeout=10)
        raise RealError("what went wrong first")

    monkeypatch.setattr(router_module.EventRouter, "_route_chunk", dies)
    with pytest.raises(RealError):
        await eng.router.route_once()
    monkeypatch.undo()
    await eng.send(identify("lm1"), track("lm1", "Started"))
    await eventually(lambda: _greeted(eng, "lm1"), what="lm1 greeted")


# -- what is the event's fault, and what is not --------------------------------------------

PINGER = {
    "id": "pinger",
    "name": "Pinger",
    "entry": {"event": "Started"},
    "steps": [
        {"id": "listen", "kind": "wait_for", "timeout": "30d",
         "events": [{"event": "Ping", "next": "reply"}]},
        {"id": "reply", "kind": "send", "template": {"body": "pong"}},
    ],
}  # fmt: skip


async def test_a_signal_one_run_rejects_dead_letters_the_event_and_the_rest_flows(eng, monkeypatch):
    await eng.publish(PINGER)
    await eng.send(
        identify("full"), track("full", "Started"), identify("ok"), track("ok", "Started")
    )
    full = (await eng.run("pinger", "full")).id
    real = WorkflowHandle.signal

    async def over_limit(self: WorkflowHandle, signal: Any, *args: Any, **kwargs: Any) -> Any:
        if self.id == full:  # what the server answers a run past its 10,000 signals
            raise RPCError(
                "exceeded workflow execution limit for signal events",
                RPCStatusCode.INVALID_ARGUMENT,
                b"",
            )
        return await real(self, signal, *args, **kwargs)

    monkeypatch.setattr(WorkflowHandle, "signal", over_limit)
    ping = track("full", "Ping")
    await eng.send(ping, track("ok", "Ping"))

    async def ponged() -> bool:
        return any(m["body"] == "pong" for m in await eng.messages("ok"))

    await eventually(ponged, what="the other run answered")
    (letter,) = await dead_letters(eng)
    assert letter["message_id"] == ping["messageId"]
    assert "exceeded workflow execution limit" in letter["error"]


async def test_a_failure_of_every_start_dead_letters_nothing(eng, monkeypatch):
    async def refused(*args: Any) -> Any:  # e.g. a search attribute missing on the server
        raise RPCError(
            "search attribute JourneyStep is not defined", RPCStatusCode.INVALID_ARGUMENT, b""
        )

    monkeypatch.setattr(router_module, "start_run", refused)
    users = [f"sa-{i}" for i in range(3)]
    with pytest.raises(RPCError):
        await eng.send(*[e for u in users for e in (identify(u), track(u, "Started"))])
    with pytest.raises(RPCError):
        await eng.router.route_once()  # retried, still failing: still nothing set aside
    assert await dead_letters(eng) == []
    monkeypatch.undo()  # the operator registers the attribute
    assert await _route_all(eng) == 6
    for u in users:
        await eventually(lambda u=u: _greeted(eng, u), what=f"{u} greeted")
    assert await dead_letters(eng) == []


async def test_an_error_every_event_hits_is_systemic_and_dead_letters_nothing(eng, monkeypatch):
    def broken(name: object) -> bool:  # a bug every event runs into
        raise ValueError("timezone check is broken")

    monkeypatch.setattr(profiles_module, "valid_timezone", broken)
    users = [f"sy-{i}" for i in range(3)]
    await store_only(eng, *[e for u in users for e in (identify(u), track(u, "Started"))])
    failed: BaseException | None = None
    try:
        await eng.router.route_once()
    except Exception as err:  # asserted below, after what matters most
        failed = err
    assert await dead_letters(eng) == []
    assert isinstance(failed, router_module.SystemicRoutingError), failed
    assert isinstance(failed.__cause__, ValueError)
    # Left out of the next rounds, retried on their own timer: still failing, and nothing
    # else routed to tell them apart from a fault of the system, so still nothing set aside.
    assert await eng.router.route_once() == 0
    assert await eng.router.retry_holds(every=True) == 0
    assert await dead_letters(eng) == []
    monkeypatch.undo()  # the fix is deployed
    assert await eng.router.retry_holds(every=True) == 6
    for u in users:
        await eventually(lambda u=u: _greeted(eng, u), what=f"{u} greeted")
    assert await dead_letters(eng) == []


async def test_an_unreadable_stored_run_holds_its_customers_events_back_without_dead_letters(eng):
    await eng.send(identify("hx1"), track("hx1", "Started"))
    await eventually(lambda: _greeted(eng, "hx1"), what="hx1 greeted")
    cid = await eng.customer("hx1")
    # A deploy changed the event model: this customer's stored entry no longer validates.
    await eng.pool.execute(
        "UPDATE journey_runs SET entry = '{\"unexpected\": true}'::jsonb WHERE customer_id = $1",
        cid,
    )
    held = track("hx1", "Clicked")
    await store_only(eng, held, identify("hx2"), track("hx2", "Started"))
    with pytest.raises(router_module.RoutingHeld):
        await eng.router.route_once()
    await eventually(lambda: _greeted(eng, "hx2"), what="hx2 greeted meanwhile")
    assert await eng.router.route_once() == 0  # left out of the next rounds
    assert await eng.router.retry_holds(every=True) == 0  # held back again, never set aside
    assert await dead_letters(eng) == []
    unrouted = "SELECT count(*) FROM events WHERE message_id = $1 AND routed_at IS NULL"
    assert await eng.pool.fetchval(unrouted, held["messageId"]) == 1
    await eng.pool.execute("UPDATE journey_runs SET entry = NULL WHERE customer_id = $1", cid)
    assert await eng.router.retry_holds(every=True) == 1
    assert await eng.pool.fetchval(unrouted, held["messageId"]) == 0


async def test_an_event_no_signal_can_carry_is_dead_lettered_not_refused_by_the_server(eng):
    # Over Temporal's 2 MB payload limit: refused starts are not the event's fault (see the
    # router), so the event's size is checked before any call and it is set aside on its own.
    big = await insert_raw(eng, track("big-1", "Started"), "now()")
    await eng.pool.execute(  # stored before the API's 32 KB limit, or by another writer
        "UPDATE events SET payload = jsonb_set(payload, '{properties}', "
        "jsonb_build_object('blob', repeat('x', 2500000))) WHERE id = $1",
        big,
    )
    await eng.send(identify("small-1"), track("small-1", "Started"))
    await eventually(lambda: _greeted(eng, "small-1"), what="small-1 greeted")
    (letter,) = await dead_letters(eng)
    assert letter["event_id"] == big
    assert "over the 524288 a signal carries" in letter["error"]


# -- held and suspect events wait on their own timer; routing goes on ----------------------


def _broken_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Identify events with the zone `Broken/Zone` fail while routed (a data error)."""
    real = profiles_module.valid_timezone

    def broken(name: object) -> bool:
        if name == "Broken/Zone":
            raise ValueError("timezone: cannot handle Broken/Zone")
        return real(name)

    monkeypatch.setattr(profiles_module, "valid_timezone", broken)


async def _routing(eng: Engine) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(eng.router.run(stop))


async def _stopped(stop: asyncio.Event, running: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(running, timeout=30)


async def test_a_full_batch_of_poison_events_at_the_front_does_not_stop_routing(eng, monkeypatch):
    _broken_zone(monkeypatch)
    eng.router.hold_retry = 0.05
    poison = []
    for i in range(2500):  # one bad client batch, older than anything else
        e = identify(f"px-{i % 500}", timezone="Broken/Zone")
        e["timestamp"] = "2026-01-01T00:00:00Z"
        poison.append(e)
    await store_only(eng, *poison)
    users = [f"pg-{i}" for i in range(5)]
    await store_only(eng, *[e for u in users for e in (identify(u), track(u, "Started"))])
    stop, running = await _routing(eng)
    try:
        for u in users:
            await eventually(lambda u=u: _greeted(eng, u), within=60, what=f"{u} greeted")

        async def all_set_aside() -> bool:
            return await eng.pool.fetchval("SELECT count(*) FROM dead_letters") == len(poison)

        await eventually(all_set_aside, within=120, what="every poison event dead-lettered")
    finally:
        await _stopped(stop, running)
    letters = await dead_letters(eng)
    assert {r["message_id"] for r in letters} == {e["messageId"] for e in poison}
    assert all("cannot handle Broken/Zone" in r["error"] for r in letters)
    assert await eng.pool.fetchval("SELECT count(*) FROM events WHERE routed_at IS NULL") == 0


async def _hold(eng: Engine, user: str) -> None:
    """Make `user`'s stored run unreadable (a deploy changed the event model)."""
    await eng.send(identify(user), track(user, "Started"))
    await eventually(lambda: _greeted(eng, user), what=f"{user} greeted")
    await eng.pool.execute(
        "UPDATE journey_runs SET entry = '{\"unexpected\": true}'::jsonb WHERE customer_id = $1",
        await eng.customer(user),
    )


_UNROUTED = "SELECT count(*) FROM events WHERE message_id = ANY($1::text[]) AND routed_at IS NULL"


async def test_a_held_customer_does_not_slow_the_others(eng):
    eng.router.hold_retry, eng.router.hold_retry_max = 0.05, 0.2
    await _hold(eng, "hb1")
    held = track("hb1", "Clicked")
    await store_only(eng, held, identify("hb2"), track("hb2", "Started"))
    with pytest.raises(router_module.RoutingHeld):
        await eng.router.route_once()  # the round that finds it routes the others
    await eventually(lambda: _greeted(eng, "hb2"), what="hb2 greeted")
    # The held customer's later events wait too (its order is kept); the others' are
    # routed in one round, without selecting the held events again.
    later = identify("hb1", plan="pro")
    await store_only(eng, later, identify("hb3"), track("hb3", "Started"))
    assert await eng.router.route_once() == 2
    assert await eng.router.route_once() == 0
    await eventually(lambda: _greeted(eng, "hb3"), what="hb3 greeted")
    waiting = [held["messageId"], later["messageId"]]
    assert await eng.pool.fetchval(_UNROUTED, waiting) == 2
    # In the loop: a hold is no reason to back off, and a NOTIFY routes the others at once.
    stop, running = await _routing(eng)
    try:
        await store_only(eng, identify("hb4"), track("hb4", "Started"))
        await eventually(lambda: _greeted(eng, "hb4"), what="hb4 greeted")
        assert eng.router.backoffs == 0
        assert await eng.pool.fetchval(_UNROUTED, waiting) == 2
        assert await dead_letters(eng) == []
        # Fixed: the held events are routed by their own timer, in order.
        await eng.pool.execute(
            "UPDATE journey_runs SET entry = NULL WHERE customer_id = $1",
            await eng.customer("hb1"),
        )

        async def released() -> bool:
            return await eng.pool.fetchval(_UNROUTED, waiting) == 0

        await eventually(released, what="the held events routed after the fix")
    finally:
        await _stopped(stop, running)
    cid = await eng.customer("hb1")
    assert await eng.pool.fetchval("SELECT traits FROM customers WHERE id = $1", cid) == {
        "plan": "pro"
    }
    assert await dead_letters(eng) == []


@pytest.mark.parametrize("count", [1, 2])
async def test_a_lone_poison_event_is_dead_lettered_with_nothing_else_arriving(
    eng, monkeypatch, count
):
    _broken_zone(monkeypatch)
    eng.router.hold_retry = 0.05
    eng.router.lone_span = 0.0  # in production a minute; tries alone are still required
    bad = [identify("lp1", timezone="Broken/Zone") for _ in range(count)]  # one customer's
    await store_only(eng, *bad)
    stop, running = await _routing(eng)
    try:

        async def set_aside() -> list[asyncpg.Record]:
            letters = await dead_letters(eng)
            return letters if len(letters) == count else []

        letters = await eventually(set_aside, what="the lone poison events dead-lettered")
    finally:
        await _stopped(stop, running)
    assert [r["message_id"] for r in letters] == [e["messageId"] for e in bad]
    assert all(r["failures"] >= router_module.LONE_FAILURES for r in letters)
    assert all("cannot handle Broken/Zone" in r["error"] for r in letters)


async def test_suspects_of_several_customers_wait_for_another_event_to_route(eng, monkeypatch):
    _broken_zone(monkeypatch)
    eng.router.lone_span = 0.0
    bad = [identify(f"ls-{i}", timezone="Broken/Zone") for i in range(2)]
    await store_only(eng, *bad)
    with pytest.raises(router_module.SystemicRoutingError):
        await eng.router.route_once()
    for _ in range(3):  # failing alone again and again: maybe a fault of the system
        assert await eng.router.retry_holds(every=True) == 0
    assert await dead_letters(eng) == []
    await eng.send(identify("ls-ok"))  # something routes: the fault is theirs
    assert await eng.router.retry_holds(every=True) == 2
    assert len(await dead_letters(eng)) == 2


async def test_an_unreadable_old_journey_version_does_not_stop_routing(eng):
    await eng.publish(PINGER)
    await eng.publish({**PINGER, "name": "Pinger v2"})
    # A deploy made version 1 unreadable (it validated when it was published).
    await eng.pool.execute(
        "UPDATE journey_versions SET definition = definition || '{\"steps\": 7}'::jsonb "
        "WHERE journey_id = 'pinger' AND version = 1"
    )
    eng.router.journeys_changed()
    await eng.send(identify("uv1"), track("uv1", "Started"))
    await eventually(lambda: _greeted(eng, "uv1"), what="uv1 greeted")
    desc = await (await eng.run("pinger", "uv1")).describe()
    assert (await desc.memo()).get("enrollment")  # entered the readable current version


async def test_an_unreadable_current_version_holds_its_events_and_the_rest_flows(eng):
    await eng.publish(PINGER)
    await eng.publish({**PINGER, "name": "Pinger v2"})
    await eng.pool.execute(
        "UPDATE journey_versions SET definition = definition || '{\"steps\": 7}'::jsonb "
        "WHERE journey_id = 'pinger' AND version = 2"
    )
    eng.router.journeys_changed()
    pinged = track("uc1", "Ping")  # only pinger reacts to it: held, never routed past it
    with pytest.raises(router_module.RoutingHeld):
        await eng.send(identify("uc2"), track("uc2", "Seen"), pinged)
    assert await eng.pool.fetchval(_UNROUTED, [pinged["messageId"]]) == 1
    assert await eng.customer("uc2")  # the others were routed
    assert await dead_letters(eng) == []
    # Publishing a readable version is the fix: the held event is retried at once.
    await eng.publish({**PINGER, "name": "Pinger v3"})
    assert await eng.router.retry_holds() == 1
    assert await eng.pool.fetchval(_UNROUTED, [pinged["messageId"]]) == 0
