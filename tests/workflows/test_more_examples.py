"""The other example journeys, each run on the time-skipping server and its history replayed."""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from models.runtime import JourneyRunResult, RunSummary
from tests.harness import engine, identify, track
from workflows.journey import JourneyWorkflow, workflow_id_for


async def _replays(handle: WorkflowHandle) -> None:
    replayer = Replayer(workflows=[JourneyWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(await handle.fetch_history())


async def test_appointment_reminders_per_appointment_and_cancellation(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("appointment_reminders")
        now = await ts_env.get_current_time()
        at = {k: (now + timedelta(days=d)).isoformat() for k, d in (("A", 3), ("B", 5))}
        await eng.send(identify("pat", first_name="Pat"))
        await eng.send(
            track("pat", "Appointment Booked", appointment_id="A", start_time=at["A"],
                  service="Dental check-up"),
            track("pat", "Appointment Booked", appointment_id="B", start_time=at["B"]),
        )  # fmt: skip
        await eng.send(track("pat", "Appointment Cancelled", appointment_id="B"))
        cid = await eng.customer("pat")
        a, b = (
            ts_env.client.get_workflow_handle(
                workflow_id_for("appointment_reminders", cid, key), result_type=JourneyRunResult
            )
            for key in ("A", "B")
        )
        async with ts_env.time_skipping_unlocked():
            assert (await b.result()).exit_reason == "exit_on:Appointment Cancelled"
            assert (await a.result()).sends == 2
        subjects = [m["subject"] for m in await eng.messages("pat")]
        assert subjects == ["Tomorrow: Dental check-up", "In two hours: Dental check-up"]
        await _replays(a)
        await _replays(b)


async def test_cross_sell_by_value_and_goal(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("post_purchase_cross_sell")
        await eng.send(*[track("loyal", "Order Completed", revenue=300) for _ in range(4)])
        await eng.send(track("new", "Order Completed", revenue=20))
        await eng.send(track("quick", "Order Completed", revenue=20))
        await eng.send(track("quick", "Product Added"))  # converts during the 3-day wait
        loyal = await eng.run("post_purchase_cross_sell", "loyal")
        assert (await eng.result(loyal)).steps[-1] == "premium_offer"
        new = await eng.run("post_purchase_cross_sell", "new")
        assert (await eng.result(new)).steps[-1] == "everyday_offer"
        quick = await eng.run("post_purchase_cross_sell", "quick")
        result = await eng.result(quick)
        assert (result.status, result.exit_reason, result.sends) == ("exited", "goal", 0)
        assert await db.fetchval("SELECT count(*) FROM journey_runs WHERE goal_at IS NOT NULL") == 1
        for handle in (loyal, new, quick):
            await _replays(handle)


async def test_win_back_holdout_split_and_goal(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("win_back")
        users = [f"lapsed{i}" for i in range(40)]
        await eng.send(*[track(u, "Customer Lapsed") for u in users])
        await eng.send(*[track(u, "Order Completed") for u in users[:20]])
        for u in users:
            await eng.result(await eng.run("win_back", u))
        rows = await db.fetch("SELECT arm, holdout, goal_at IS NOT NULL AS won FROM journey_runs")
        assert sum(r["won"] for r in rows) == 20
        assert {r["arm"] for r in rows if not r["holdout"]} == {"ten", "twenty"}
        held = [r for r in rows if r["holdout"]]
        sent = await db.fetchval("SELECT count(DISTINCT customer_id) FROM messages")
        assert sent == 40 - len(held)
        await _replays(await eng.run("win_back", users[0]))


async def test_onboarding_resumes_where_the_customer_left_off(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("onboarding")
        # Ahead: connected and created a project in the same breath as signing up.
        await eng.send(
            track("ahead", "Signed Up"), track("ahead", "Account Connected"),
            track("ahead", "Project Created"),
        )  # fmt: skip
        # Stalled: never connects.
        await eng.send(track("stalled", "Signed Up"))
        ahead = await eng.run("onboarding", "ahead")
        result = await eng.result(ahead)
        assert result.steps == ["welcome", "connected", "project_created", "celebrate"]
        summary = await ahead.query("summary", result_type=RunSummary)
        assert "goal" in summary.results
        stalled = await eng.result(await eng.run("onboarding", "stalled"))
        assert stalled.steps == ["welcome", "connected", "nudge_connect", "connected_after_nudge"]
        bodies = [m["subject"] for m in await eng.messages("stalled")]
        assert bodies == ["Welcome aboard, friend", "Connect your account in two minutes"]
        await _replays(ahead)
