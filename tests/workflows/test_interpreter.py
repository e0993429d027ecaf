"""Interpreter rules beyond the examples: wait_for outcomes, dedupe, continue-as-new,
re-routing after a crash, identity merges. Time-skipping server, real Postgres."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio.testing import WorkflowEnvironment

from models.runtime import JourneyEvent, RunSummary
from tests.harness import engine, identify, track


def _journey(jid: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": jid, "name": jid, "entry": {"event": "Started"}, "steps": steps, **extra}


WAIT_FOR = _journey(
    "wait_for_order",
    [
        {
            "id": "await_order",
            "kind": "wait_for",
            "timeout": "1h",
            "on_timeout": "nudge",
            "events": [
                {
                    "event": "Order Completed",
                    "conditions": {"path": "event.properties.total", "op": "gte", "value": 10},
                    "next": "thanks",
                }
            ],
        },
        {"id": "nudge", "kind": "send", "template": {"body": "still there?"}, "next": "end"},
        {"id": "thanks", "kind": "send", "template": {"body": "thanks for {{ event.event }}"}},
    ],
)


async def test_wait_for_takes_the_event_branch_when_conditions_match(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish(WAIT_FOR)
        await eng.send(track("a", "Started"))
        handle = await eng.run("wait_for_order", "a")
        await eng.send(track("a", "Order Completed", total=5))  # below the threshold
        await eng.send(track("a", "Order Completed", total=50))
        result = await eng.result(handle)
        assert result.steps == ["await_order", "thanks"]
        summary = await handle.query("summary", result_type=RunSummary)
        assert summary.results["await_order"]["event"]["properties"] == {"total": 50}
        assert [m["body"] for m in await eng.messages("a")] == ["thanks for Started"]


async def test_wait_for_times_out_to_its_branch(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish(WAIT_FOR)
        await eng.send(track("b", "Started"))
        result = await eng.result(await eng.run("wait_for_order", "b"))
        assert result.steps == ["await_order", "nudge"]
        assert [m["step_id"] for m in await eng.messages("b")] == ["nudge"]


TWO_CLICKS = _journey(
    "two_clicks",
    [
        {"id": "first", "kind": "wait_for", "timeout": "1h", "events": [{"event": "Clicked"}]},
        {
            "id": "second",
            "kind": "wait_for",
            "timeout": "1h",
            "on_timeout": "end",
            "events": [{"event": "Clicked", "next": "clicked_twice"}],
        },
        {"id": "clicked_twice", "kind": "send", "template": {"body": "two clicks"}},
    ],
)


async def test_an_event_delivered_twice_counts_once(db, ts_env):
    twice = TWO_CLICKS
    async with engine(db, ts_env) as eng:
        await eng.publish(twice)
        await eng.send(track("c", "Started"))
        handle = await eng.run("two_clicks", "c")
        cid = await eng.customer("c")
        click = JourneyEvent(
            message_id="click-1", type="track", event="Clicked",
            timestamp=await ts_env.get_current_time(), customer_id=cid,
        )  # fmt: skip
        await handle.signal("events", [click])
        await handle.signal("events", [click])  # the router re-delivers after a crash
        result = await eng.result(handle)
        assert result.steps == ["first", "second"]
        assert await eng.messages("c") == []


async def test_long_runs_continue_as_new_without_losing_state(db, ts_env):
    steps: list[dict[str, Any]] = []
    for i in range(4):
        steps += [
            {"id": f"wait_{i}", "kind": "wait", "duration": "1d"},
            {"id": f"send_{i}", "kind": "send", "template": {"body": f"day {i}"}},
        ]
    steps.append(
        {"id": "finish", "kind": "wait_for", "timeout": "30d", "events": [{"event": "Finish"}]}
    )
    async with engine(db, ts_env, history_limit=20) as eng:
        await eng.publish(_journey("long", steps, exit_on=[{"event": "Cancel"}]))
        await eng.send(track("d", "Started"))
        handle = await eng.run("long", "d")
        await ts_env.sleep(timedelta(days=5))
        await eng.send(track("d", "Finish"))
        result = await eng.result(handle)
        assert result.status == "completed"
        assert result.continued >= 1
        assert result.sends == 4
        assert result.steps[-1] == "finish"
        msgs = await eng.messages("d")
        assert [m["body"] for m in msgs] == ["day 0", "day 1", "day 2", "day 3"]
        assert len({m["idempotency_key"] for m in msgs}) == 4


async def test_rerouting_a_chunk_neither_restarts_nor_resends(db, ts_env):
    greet = _journey(
        "greet",
        [
            {"id": "hello", "kind": "send", "template": {"body": "hi"}},
            {"id": "linger", "kind": "wait", "duration": "1h"},
        ],
    )
    async with engine(db, ts_env) as eng:
        await eng.publish(greet)
        await eng.send(track("e", "Started"))
        handle = await eng.run("greet", "e")
        # As if the router died after calling Temporal and before marking the chunk routed.
        await db.execute("UPDATE events SET routed_at = NULL")
        await db.execute("UPDATE journey_runs SET status = 'starting', run_id = NULL")
        assert await eng.router.route_once() == 1
        result = await eng.result(handle)
        assert result.sends == 1
        assert len(await eng.messages("e")) == 1
        assert await db.fetchval("SELECT count(*) FROM journey_runs") == 1
        assert await db.fetchval("SELECT count(*) FROM customers") == 1


async def test_anonymous_journey_follows_the_customer_after_a_merge(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("cart_recovery", "welcome_series")
        await eng.send({"type": "track", "anonymousId": "anon-7", "event": "Product Added"})
        anon_run = await eng.run("cart_recovery", "anon-7")
        await eng.send(identify("u-7", first_name="Gil"))
        known = await eng.customer("u-7")
        assert known != await db.fetchval(
            "SELECT customer_id FROM identities WHERE value = 'anon-7'"
        )
        await eng.send({**identify("u-7"), "anonymousId": "anon-7"})  # ties the two together
        assert await eng.customer("anon-7") == known
        await eng.send(track("u-7", "Order Completed"))
        result = await eng.result(anon_run)
        assert (result.status, result.sends) == ("exited", 0)
        summary = await anon_run.query("summary", result_type=RunSummary)
        assert summary.customer_id == known
        assert await db.fetchval("SELECT count(*) FROM events WHERE customer_id = $1", known) == 4


async def test_reentry_never_enters_once(db, ts_env: WorkflowEnvironment):
    once = _journey(
        "once",
        [{"id": "hello", "kind": "send", "template": {"body": "hi"}}],
        re_entry={"policy": "never"},
    )
    async with engine(db, ts_env) as eng:
        await eng.publish(once)
        await eng.send(track("f", "Started"))
        await eng.result(await eng.run("once", "f"))
        await eng.send(track("f", "Started"))
        assert len(await eng.messages("f")) == 1
        assert await db.fetchval("SELECT count(*) FROM journey_runs") == 1


async def test_two_events_in_one_batch_count_as_two(db, ts_env):
    twice = TWO_CLICKS
    async with engine(db, ts_env) as eng:
        await eng.publish(twice)
        # One router chunk: the entry and both clicks reach the run in one delivery.
        await eng.send(track("t2", "Started"), track("t2", "Clicked"), track("t2", "Clicked"))
        result = await eng.result(await eng.run("two_clicks", "t2"))
        assert result.steps == ["first", "second", "clicked_twice"]


async def test_an_entry_that_arrives_as_the_run_ends_starts_a_new_run(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("cart_recovery", "welcome_series")
        await eng.send(track("nc", "Product Added", name="Old cart"))
        first = await eng.run("cart_recovery", "nc")
        # An order ends the run; a new cart comes in the same delivery, right after it.
        await eng.send(track("nc", "Order Completed"), track("nc", "Product Added", name="New"))
        assert (await eng.result(first)).status == "exited"
        # The finished run handed the new cart back to the router, which starts a new run.
        assert await eng.router.route_once() == 1
        rows = await db.fetch("SELECT status FROM journey_runs ORDER BY started_at")
        assert [r["status"] for r in rows] == ["exited", "running"]
        second = await eng.run("cart_recovery", "nc")
        result = await eng.result(second)
        assert (result.status, result.sends) == ("completed", 2)
        subjects = [m["subject"] for m in await eng.messages("nc")]
        assert subjects == ["New is still in your cart", "Last chance: New"]


async def test_merging_two_customers_in_the_same_journey_keeps_one_run(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("cart_recovery", "welcome_series")
        await eng.send({"type": "track", "anonymousId": "anon-8", "event": "Product Added"})
        await eng.send(track("u-8", "Product Added", name="Lamp"))
        loser_run = await eng.run("cart_recovery", "anon-8")
        survivor_run = await eng.run("cart_recovery", "u-8")
        await eng.send({**identify("u-8"), "anonymousId": "anon-8"})
        lost = await eng.result(loser_run)
        assert lost.status == "exited"
        assert lost.exit_reason.startswith("operator: merged into")
        kept = await eng.result(survivor_run)
        assert (kept.status, kept.sends) == ("completed", 2)
        assert len(await eng.messages("u-8")) == 2


async def test_a_template_that_fails_at_run_time_fails_the_send_not_the_run(db, ts_env):
    journey = _journey(
        "bad_math",
        [
            {"id": "oops", "kind": "send", "template": {"body": "{{ profile.n + 1 }}"}},
            {"id": "after", "kind": "send", "template": {"body": "still here"}},
        ],
    )
    async with engine(db, ts_env) as eng:
        await eng.publish(journey)
        await eng.send(identify("bm", n="not a number"), track("bm", "Started"))
        handle = await eng.run("bad_math", "bm")
        result = await eng.result(handle)
        # The run goes on; the failed send is counted and stored as a failed message.
        assert (result.status, result.failures) == ("completed_with_failures", 1)
        summary = await handle.query("summary", result_type=RunSummary)
        assert summary.results["oops"]["status"] == "failed"
        assert "TemplateError" in summary.results["oops"]["error"]
        sent = [(m["status"], m["body"]) for m in await eng.messages("bm")]
        assert sent == [("failed", ""), ("sent", "still here")]


async def test_a_customers_events_apply_in_timestamp_order(db, ts_env):
    async with engine(db, ts_env) as eng:
        # Sent newest first (an offline queue flushing): applied oldest first.
        await eng.send(
            {**identify("ord", plan="pro"), "timestamp": "2026-03-02T10:00:00Z"},
            {**identify("ord", plan="free", seats=1), "timestamp": "2026-03-01T10:00:00Z"},
        )
        cid = await eng.customer("ord")
        traits = await db.fetchval("SELECT traits FROM customers WHERE id = $1", cid)
        assert traits == {"plan": "pro", "seats": 1}
