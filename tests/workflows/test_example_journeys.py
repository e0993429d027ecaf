"""The example journeys on the time-skipping server: days of timers in milliseconds."""

from __future__ import annotations

from datetime import timedelta

from temporalio.testing import WorkflowEnvironment

from models.runtime import RunSummary
from tests.harness import engine, identify, track


async def test_cart_reminders_are_sent_after_15_minutes_and_1_day(db, ts_env: WorkflowEnvironment):
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("cart_recovery", "welcome_series")
        await eng.send(track("ann", "Product Added", name="Blue Mug", url="https://s/cart/1"))
        handle = await eng.run("cart_recovery", "ann")
        result = await eng.result(handle)
        assert result.status == "completed"
        assert result.sends == 2
        assert result.steps == [
            "wait_15_minutes", "first_reminder", "wait_1_day", "second_reminder",
        ]  # fmt: skip
        msgs = await eng.messages("ann")
        assert [m["step_id"] for m in msgs] == ["first_reminder", "second_reminder"]
        assert msgs[0]["subject"] == "Blue Mug is still in your cart"
        assert "https://s/cart/1" in msgs[0]["body"]
        assert msgs[1]["subject"] == "Last chance: Blue Mug"
        assert len({m["idempotency_key"] for m in msgs}) == 2
        summary = await handle.query("summary", result_type=RunSummary)
        waits = {h.step_id: h.left_at - h.entered_at for h in summary.history if h.left_at}
        # Timers fire on time (plus the few ms a workflow task takes on the server clock).
        assert timedelta(minutes=15) <= waits["wait_15_minutes"] < timedelta(minutes=16)
        assert timedelta(days=1) <= waits["wait_1_day"] < timedelta(days=1, minutes=1)
        row = await db.fetchrow("SELECT status FROM journey_runs WHERE workflow_id = $1", handle.id)
        assert row["status"] == "completed"


async def test_purchase_during_first_wait_sends_nothing(db, ts_env: WorkflowEnvironment):
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("cart_recovery", "welcome_series")
        await eng.send(track("bob", "Product Added", name="Lamp"))
        await eng.send(track("bob", "Order Completed", order_id="o1", total=30))
        result = await eng.result(await eng.run("cart_recovery", "bob"))
        assert result.status == "exited"
        assert result.exit_reason == "exit_on:Order Completed"
        assert result.sends == 0
        assert await eng.messages("bob") == []


async def test_purchase_after_first_reminder_stops_the_second(db, ts_env: WorkflowEnvironment):
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("cart_recovery", "welcome_series")
        await eng.send(track("cy", "Product Added", name="Chair"))
        handle = await eng.run("cart_recovery", "cy")
        await ts_env.sleep(timedelta(hours=2))  # past the 15 minutes, well before the day
        await eng.send(track("cy", "Order Completed", order_id="o2"))
        result = await eng.result(handle)
        assert result.status == "exited"
        assert [m["step_id"] for m in await eng.messages("cy")] == ["first_reminder"]


async def test_welcome_series_branches_on_orders(db, ts_env: WorkflowEnvironment):
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("cart_recovery", "welcome_series")
        await eng.send(identify("dee", email="dee@example.com", first_name="Dee"))
        await eng.send(identify("eve", email="eve@example.com"))
        dee = await eng.run("welcome_series", "dee")
        eve = await eng.run("welcome_series", "eve")
        await eng.send(track("dee", "Order Completed", order_id="o3", total=12))
        assert (await eng.result(dee)).steps[-1] == "thank_buyer"
        assert (await eng.result(eve)).steps[-1] == "first_order_nudge"
        dee_msgs = await eng.messages("dee")
        assert [m["subject"] for m in dee_msgs] == ["Welcome, Dee!", "Thanks for your order"]
        assert [m["step_id"] for m in await eng.messages("eve")] == [
            "welcome", "first_order_nudge",
        ]  # fmt: skip


async def test_identify_without_email_does_not_enter_welcome(db, ts_env: WorkflowEnvironment):
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("cart_recovery", "welcome_series")
        await eng.send(identify("fay", first_name="Fay"))
        runs = await db.fetchval("SELECT count(*) FROM journey_runs")
        assert runs == 0
