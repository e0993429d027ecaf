"""Audience launches (durable, rate-limited, restart-safe, cancellable) and scheduled launches,
against real Postgres and the Temporal dev server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from models.audience import compile_audience
from models.conditions import evaluate
from tests.conftest import eventually
from tests.harness import ADMIN, admin_api, engine

JOURNEY = {
    "id": "promo_launch",
    "name": "Promo launch",
    "entry": {"event": "Promo Requested"},
    "steps": [
        {"id": "offer", "kind": "send", "template": {"body": "offer"}},
        {"id": "linger", "kind": "wait", "duration": "1h"},
    ],
}
PRO = {"path": "profile.traits.plan", "op": "eq", "value": "pro"}


async def _customers(db, n: int) -> None:
    await db.executemany(
        "INSERT INTO customers (id, traits) VALUES ($1, $2)",
        [(f"c{i:05d}", {"plan": "pro" if i % 2 else "free", "n": i}) for i in range(n)],
    )


async def test_audience_sql_matches_the_condition_semantics(db):
    await _customers(db, 40)
    await db.execute(
        "INSERT INTO events (message_id, type, event, customer_id, timestamp) "
        "SELECT 'e' || id, 'track', 'Order Completed', id, now() FROM customers WHERE id < 'c00010'"
    )
    conditions = [
        PRO,
        {"all": [PRO, {"path": "profile.traits.n", "op": "gte", "value": 20}]},
        {"any": [{"path": "profile.traits.n", "op": "in", "value": [1, 2, 3]},
                 {"not": {"path": "profile.traits.plan", "op": "exists"}}]},
        {"path": "profile.stats.events.Order Completed", "op": "gte", "value": 1},
        {"path": "profile.traits.plan", "op": "starts_with", "value": "fr"},
    ]  # fmt: skip
    from pydantic import TypeAdapter

    from models.conditions import Condition

    rows = await db.fetch("SELECT id, traits FROM customers ORDER BY id")
    for raw in conditions:
        cond = TypeAdapter(Condition).validate_python(raw)
        where, params = compile_audience(cond)
        query = f"SELECT id FROM customers c WHERE {where} ORDER BY id"
        got = [r["id"] for r in await db.fetch(query, *params)]
        want = []
        for r in rows:
            orders = 1 if r["id"] < "c00010" else 0
            profile = {"traits": r["traits"], "stats": {"events": {"Order Completed": orders}}}
            if evaluate(cond, {"profile": profile}):
                want.append(r["id"])
        assert got == want, raw


async def test_launch_survives_a_worker_restart_without_double_enrolment(db, pg_url, dev_env):
    await _customers(db, 2500)
    queue = f"tq-{uuid.uuid4().hex[:8]}"
    async with engine(db, dev_env, task_queue=queue, terminate=False) as eng:
        await eng.publish(JOURNEY)
        async with admin_api(eng, pg_url) as api:
            r = await api.post(
                "/v1/journeys/promo_launch/launches",
                json={"audience": PRO, "rate_per_second": 5000, "page_size": 250},
                headers=ADMIN,
            )
            assert r.status_code == 201, r.text
            launch_id = r.json()["id"]

            async def some_enrolled() -> bool:
                row = await db.fetchrow("SELECT enrolled FROM launches WHERE id = $1", launch_id)
                return row["enrolled"] >= 250

            await eventually(some_enrolled, what="the first page")
    # The worker is gone mid-launch; a new one on the same queue takes over.
    async with engine(db, dev_env, task_queue=queue) as eng:
        async with admin_api(eng, pg_url) as api:

            async def finished() -> dict | None:
                got = (await api.get(f"/v1/launches/{launch_id}", headers=ADMIN)).json()
                return got if got["status"] == "completed" else None

            done = await eventually(finished, within=120, what="the launch to complete")
    assert done["enrolled"] == 1250
    assert await db.fetchval("SELECT count(*) FROM journey_runs") == 1250
    assert await db.fetchval("SELECT count(DISTINCT customer_id) FROM journey_runs") == 1250
    assert (
        await db.fetchval(
            "SELECT count(*) FROM journey_runs r JOIN customers c ON c.id = r.customer_id "
            "WHERE c.traits->>'plan' <> 'pro'"
        )
        == 0
    )


async def test_cancel_stops_a_launch_and_bad_audiences_are_refused(db, pg_url, dev_env):
    await _customers(db, 600)
    async with engine(db, dev_env) as eng:
        await eng.publish(JOURNEY)
        async with admin_api(eng, pg_url) as api:
            bad = await api.post(
                "/v1/journeys/promo_launch/launches",
                json={"audience": {"path": "event.properties.x", "op": "exists"}},
                headers=ADMIN,
            )
            assert (bad.status_code, bad.json()["code"]) == (400, "invalid_audience")
            assert "event.properties.x" in bad.json()["message"]
            r = await api.post(
                "/v1/journeys/promo_launch/launches",
                json={"rate_per_second": 20, "page_size": 20},
                headers=ADMIN,
            )
            launch_id = r.json()["id"]

            async def started() -> bool:
                got = (await api.get(f"/v1/launches/{launch_id}", headers=ADMIN)).json()
                return got["enrolled"] > 0

            await eventually(started, what="the launch to start")
            await api.post(f"/v1/launches/{launch_id}/cancel", headers=ADMIN)

            async def cancelled() -> dict | None:
                got = (await api.get(f"/v1/launches/{launch_id}", headers=ADMIN)).json()
                return got if got["status"] == "cancelled" else None

            got = await eventually(cancelled, what="the launch to stop")
            assert 0 < got["enrolled"] < 600
            assert await db.fetchval("SELECT count(*) FROM journey_runs") == got["enrolled"]


async def test_scheduled_launches_once_and_recurring(db, pg_url, dev_env):
    await _customers(db, 30)
    async with engine(db, dev_env) as eng:
        await eng.publish(JOURNEY)
        async with admin_api(eng, pg_url) as api:
            url = "/v1/journeys/promo_launch/schedules"
            bad = await api.post(url, json={"cron": "not a cron"}, headers=ADMIN)
            assert bad.status_code == 400
            neither = await api.post(url, json={}, headers=ADMIN)
            assert neither.status_code == 400
            at = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
            once = (await api.post(url, json={"at": at.isoformat()}, headers=ADMIN)).json()
            assert once["next_runs"] == [at.isoformat().replace("+00:00", "Z")] or [
                datetime.fromisoformat(t) for t in once["next_runs"]
            ] == [at]
            weekly = await api.post(
                url, json={"cron": "0 9 * * 1", "audience": PRO, "rate_per_second": 1000},
                headers=ADMIN,
            )  # fmt: skip
            assert weekly.status_code == 201
            sid = weekly.json()["id"]

            async def listed() -> bool:  # the schedule list comes from (eventual) visibility
                ids = {s["id"] for s in (await api.get("/v1/schedules", headers=ADMIN)).json()}
                return {sid, once["id"]} <= ids

            await eventually(listed, what="both schedules to be listed")
            paused = (await api.post(f"/v1/schedules/{sid}/pause", headers=ADMIN)).json()
            assert paused["paused"] is True
            assert (await api.post(f"/v1/schedules/{sid}/unpause", headers=ADMIN)).json()[
                "paused"
            ] is False
            # Fire it now instead of waiting for Monday 09:00.
            await dev_env.client.get_schedule_handle(sid).trigger()

            async def launched() -> bool:
                return (
                    await db.fetchval("SELECT count(*) FROM launches WHERE status = 'completed'")
                    == 1
                )

            await eventually(launched, what="the scheduled launch to run")
            assert await db.fetchval("SELECT count(*) FROM journey_runs") == 15
            for s in (sid, once["id"]):
                assert (await api.delete(f"/v1/schedules/{s}", headers=ADMIN)).status_code == 204
            assert (await api.get(f"/v1/schedules/{sid}", headers=ADMIN)).status_code == 404
