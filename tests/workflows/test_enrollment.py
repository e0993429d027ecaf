"""API-triggered enrollment, per-key runs, entry caps, and recovery of interrupted starts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from models.runtime import RunSummary
from tests.harness import ADMIN, admin_api, engine, identify, track
from workflows.journey import workflow_id_for


def _journey(jid: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": jid, "name": jid, "entry": {"event": "Started"}, "steps": steps, **extra}


ONBOARD = _journey(
    "onboard",
    [
        {"id": "hello", "kind": "send", "template": {"body": "plan {{ event.properties.plan }}"}},
        {"id": "linger", "kind": "wait", "duration": "1h"},
    ],
)


async def test_enroll_api_is_idempotent_and_passes_context(db, pg_url, dev_env):
    async with engine(db, dev_env) as eng:
        await eng.publish(ONBOARD)
        await eng.send(identify("en", email="en@example.com"))
        async with admin_api(eng, pg_url) as api:
            body = {"customer": "en", "idempotency_key": "k-1", "context": {"plan": "pro"}}
            first = await api.post("/v1/journeys/onboard/enroll", json=body, headers=ADMIN)
            assert first.status_code == 201, first.text
            again = await api.post("/v1/journeys/onboard/enroll", json=body, headers=ADMIN)
            assert again.status_code == 200
            assert again.json()["enrollment_id"] == first.json()["enrollment_id"]
            assert again.json()["created"] is False
            other = {**body, "idempotency_key": "k-2"}
            busy = await api.post("/v1/journeys/onboard/enroll", json=other, headers=ADMIN)
            assert busy.status_code == 409
            assert busy.json()["code"] == "not_enrolled"
            assert "already in this journey" in busy.json()["message"]
            missing = {**body, "customer": "nobody"}
            r = await api.post("/v1/journeys/onboard/enroll", json=missing, headers=ADMIN)
            assert (r.status_code, r.json()["code"]) == (404, "not_found")
            r = await api.post("/v1/journeys/nope/enroll", json=body, headers=ADMIN)
            assert r.status_code == 404
            r = await api.post("/v1/journeys/onboard/enroll", json={"customer": "en"})
            assert r.status_code == 401

        handle = dev_env.client.get_workflow_handle(first.json()["workflow_id"])

        async def sent() -> bool:
            summary = await handle.query("summary", result_type=RunSummary)
            return summary.step_id == "linger"

        from tests.conftest import eventually

        await eventually(sent, what="the enrolled run to send")
        assert [m["body"] for m in await eng.messages("en")] == ["plan pro"]
        assert await db.fetchval("SELECT count(*) FROM journey_runs") == 1


async def test_run_key_allows_one_run_per_appointment_and_cap_limits_entries(db, ts_env):
    journey = _journey(
        "per_appointment",
        [{"id": "hello", "kind": "send", "template": {"body": "{{ event.properties.id }}"}}],
        run_key="properties.id",
        max_entries=2,
    )
    async with engine(db, ts_env) as eng:
        await eng.publish(journey)
        await eng.send(track("ap", "Started", id="A"), track("ap", "Started", id="B"))
        await eng.send(track("ap", "Started", id="C"))  # over the cap of 2
        cid = await eng.customer("ap")
        for key in ("A", "B"):
            handle = ts_env.client.get_workflow_handle(workflow_id_for("per_appointment", cid, key))
            async with ts_env.time_skipping_unlocked():
                await handle.result()
        assert sorted(m["body"] for m in await eng.messages("ap")) == ["A", "B"]
        assert await db.fetchval("SELECT count(*) FROM journey_runs") == 2


async def test_an_interrupted_start_is_recovered_from_its_enrollment_row(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish(ONBOARD)
        await eng.send(identify("rc"))
        cid = await eng.customer("rc")
        defn = eng.router._journeys[0].current
        from activities.enrollment import enroll, load_history
        from models.runtime import JourneyEvent

        entry = JourneyEvent(
            message_id="enroll:crash", type="enroll", event="onboard",
            properties={"plan": "basic"}, timestamp=await ts_env.get_current_time(),
            customer_id=cid,
        )  # fmt: skip
        async with db.acquire() as conn, conn.transaction():
            history = (await load_history(conn, [cid]))[(cid, "onboard")]
            start = await enroll(conn, defn, cid, entry, [entry], history)
        # ...and the process died before starting the run.
        assert await db.fetchval("SELECT status FROM journey_runs") == "starting"
        assert await eng.router.recover_stale_starts(older_than=0) == 1
        assert await db.fetchval("SELECT status FROM journey_runs") == "running"
        handle = ts_env.client.get_workflow_handle(start.workflow_id)
        await ts_env.sleep(timedelta(minutes=1))
        summary = await handle.query("summary", result_type=RunSummary)
        assert summary.step_id == "linger"
        assert [m["body"] for m in await eng.messages("rc")] == ["plan basic"]
