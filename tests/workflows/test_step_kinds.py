"""split, holdout, goto, update_profile, score, webhook, wait at/until and goal, on the
time-skipping server with real Postgres and a real local HTTP server for webhooks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from activities.signing import BadSignature, verify_signature
from activities.waits import next_local_time, signed_duration
from models.runtime import RunSummary
from tests.harness import engine, identify, track
from tests.receiver import Receiver


def _journey(jid: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": jid, "name": jid, "entry": {"event": "Started"}, "steps": steps, **extra}


def _send(sid: str, body: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"id": sid, "kind": "send", "template": {"body": body}, **extra}


async def test_split_is_stable_and_recorded(db, ts_env):
    journey = _journey(
        "ab",
        [
            {"id": "ab", "kind": "split", "arms": [
                {"name": "A", "weight": 1, "next": "send_a"},
                {"name": "B", "weight": 1, "next": "send_b"},
            ]},
            _send("send_a", "A", next="end"),
            _send("send_b", "B"),
        ],
    )  # fmt: skip
    async with engine(db, ts_env) as eng:
        await eng.publish(journey)
        users = [f"s{i}" for i in range(40)]
        await eng.send(*[track(u, "Started") for u in users])
        arms = {}
        for u in users:
            result = await eng.result(await eng.run("ab", u))
            arms[u] = result.steps[-1]
        assert set(arms.values()) == {"send_a", "send_b"}
        rows = await db.fetch("SELECT customer_id, arm FROM journey_runs")
        assert {r["arm"] for r in rows} == {"A", "B"}
        # Same customer, same journey: the same arm on re-entry.
        await eng.send(*[track(u, "Started") for u in users[:10]])
        for u in users[:10]:
            handle = await eng.run("ab", u)
            assert (await eng.result(handle)).steps[-1] == arms[u]


async def test_holdout_gets_no_messages_but_is_tracked_to_the_goal(db, ts_env):
    journey = _journey(
        "held",
        [
            {"id": "control", "kind": "holdout", "percent": 50},
            _send("offer", "20% off"),
            {"id": "linger", "kind": "wait", "duration": "3d"},
        ],
        goal={"event": "Order Completed", "within": "7d"},
    )
    async with engine(db, ts_env) as eng:
        await eng.publish(journey)
        users = [f"h{i}" for i in range(30)]
        await eng.send(*[track(u, "Started") for u in users])
        await eng.send(*[track(u, "Order Completed") for u in users])
        for u in users:
            result = await eng.result(await eng.run("held", u))
            assert (result.status, result.exit_reason) == ("exited", "goal")
        rows = await db.fetch(
            "SELECT r.holdout, r.goal_at IS NOT NULL AS converted, count(m.id) AS sent "
            "FROM journey_runs r LEFT JOIN messages m ON m.customer_id = r.customer_id "
            "GROUP BY r.enrollment_id, r.holdout, r.goal_at"
        )
        assert {r["holdout"] for r in rows} == {True, False}
        assert all(r["converted"] for r in rows)
        assert all(r["sent"] == (0 if r["holdout"] else 1) for r in rows)


async def test_goto_loops_at_most_max_iterations(db, ts_env):
    journey = _journey(
        "loop",
        [
            _send("remind", "reminder"),
            {"id": "pause", "kind": "wait", "duration": "1d"},
            {"id": "again", "kind": "goto", "target": "remind", "max_iterations": 2},
        ],
    )
    async with engine(db, ts_env) as eng:
        await eng.publish(journey)
        await eng.send(track("g", "Started"))
        result = await eng.result(await eng.run("loop", "g"))
        assert result.sends == 3
        assert result.steps.count("again") == 3
        assert len(await eng.messages("g")) == 3


async def test_update_profile_and_score_feed_later_branches(db, ts_env):
    journey = _journey(
        "vip",
        [
            {"id": "rfm", "kind": "score", "model": "rfm"},
            {"id": "is_vip", "kind": "branch", "cases": [
                {"when": {"path": "results.rfm.f", "op": "gte", "value": 3}, "next": "tag_vip"},
            ], "else": "end"},
            {"id": "tag_vip", "kind": "update_profile", "set": {"tier": "vip"},
             "increment": {"vip_visits": 1}, "unset": ["churn_risk"], "add_tags": ["vip"],
             "remove_tags": ["new"]},
        ],
    )  # fmt: skip
    async with engine(db, ts_env) as eng:
        await eng.publish(journey)
        await eng.send(identify("v", churn_risk=True, tags=["new", "newsletter"], vip_visits=2))
        await eng.send(*[track("v", "Order Completed", revenue=120) for _ in range(4)])
        await eng.send(identify("w"))
        await eng.send(track("v", "Started"), track("w", "Started"))
        v = await eng.run("vip", "v")
        assert (await eng.result(v)).steps == ["rfm", "is_vip", "tag_vip"]
        assert (await eng.result(await eng.run("vip", "w"))).steps == ["rfm", "is_vip"]
        summary = await v.query("summary", result_type=RunSummary)
        assert summary.results["rfm"]["orders"] == 4
        assert summary.results["rfm"]["revenue"] == 480
        traits = await db.fetchval(
            "SELECT traits FROM customers WHERE id = $1", await eng.customer("v")
        )
        assert traits["tier"] == "vip"
        assert traits["vip_visits"] == 3
        assert "churn_risk" not in traits
        assert traits["tags"] == ["newsletter", "vip"]


def _hook_journey(url: str) -> dict[str, Any]:
    return _journey(
        "hook",
        [
            {"id": "crm", "kind": "webhook", "url": url, "on_error": "rejected",
             "payload": {"email": "{{ profile.email }}", "product": "{{ event.properties.sku }}"}},
            {"id": "gold", "kind": "branch", "cases": [
                {"when": {"path": "results.crm.body.segment", "op": "eq", "value": "gold"},
                 "next": "thanks"}], "else": "end"},
            _send("thanks", "gold!", next="end"),
            _send("rejected", "sorry"),
        ],
    )  # fmt: skip


async def test_webhook_response_feeds_a_branch(db, ts_env, receiver):
    async with engine(db, ts_env, signing_secret="hook-key") as eng:
        await eng.publish(_hook_journey(f"{receiver}/ok"))
        await eng.send(identify("k", email="k@example.com"))
        await eng.send(track("k", "Started", sku="SKU-1"))
        result = await eng.result(await eng.run("hook", "k"))
        assert result.steps == ["crm", "gold", "thanks"]
        (call,) = Receiver.calls
        assert call["body"] == {"email": "k@example.com", "product": "SKU-1"}
        assert call["key"]
        verify_signature("hook-key", call["signature"], call["raw"])  # signed over the raw body
        with pytest.raises(BadSignature):
            verify_signature("other-key", call["signature"], call["raw"])


async def test_webhook_4xx_is_a_branch_and_5xx_is_retried_with_one_key(db, ts_env, receiver):
    async with engine(db, ts_env) as eng:
        await eng.publish(_hook_journey(f"{receiver}/reject"))
        await eng.send(identify("x", email="x@example.com"), track("x", "Started", sku="S"))
        result = await eng.result(await eng.run("hook", "x"))
        assert result.steps == ["crm", "rejected"]
        assert len(Receiver.calls) == 1  # a 4xx is an answer, not retried

        Receiver.calls = []
        Receiver.flaky_left = 2
        await eng.publish(_hook_journey(f"{receiver}/flaky"))
        await eng.send(identify("y", email="y@example.com"), track("y", "Started", sku="S"))
        result = await eng.result(await eng.run("hook", "y"))
        assert result.steps == ["crm", "gold", "thanks"]
        assert len(Receiver.calls) == 3
        assert len({c["key"] for c in Receiver.calls}) == 1


def test_next_local_time_honours_timezone_and_weekdays():
    now = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)  # a Friday, 10:00 in New York
    at = next_local_time(now, "09:00", "America/New_York", None)
    assert at.astimezone(ZoneInfo("America/New_York")).isoformat() == "2026-11-28T09:00:00-05:00"
    weekday = next_local_time(now, "09:00", "America/New_York", ["mon", "tue"])
    assert weekday.astimezone(ZoneInfo("America/New_York")).date().isoformat() == "2026-11-30"
    assert next_local_time(now, "16:00", None, None) == datetime(2026, 11, 27, 16, 0, tzinfo=UTC)
    assert signed_duration("-2h") == -timedelta(hours=2)


async def test_appointment_reminders_24h_and_2h_before(db, ts_env):
    journey = {
        "id": "appointments",
        "name": "Appointment reminders",
        "entry": {"event": "Appointment Booked"},
        "steps": [
            {"id": "day_before", "kind": "wait", "until": "entry.properties.start_time",
             "offset": "-24h"},
            _send("remind_day", "tomorrow"),
            {"id": "two_hours_before", "kind": "wait", "until": "entry.properties.start_time",
             "offset": "-2h"},
            _send("remind_soon", "in two hours"),
        ],
    }  # fmt: skip
    async with engine(db, ts_env) as eng:
        await eng.publish(journey)
        now = await ts_env.get_current_time()
        start = (now + timedelta(days=3)).replace(microsecond=0)
        await eng.send(track("p", "Appointment Booked", start_time=start.isoformat()))
        past = (now - timedelta(hours=1)).isoformat()
        await eng.send(track("q", "Appointment Booked", start_time=past))
        handle = await eng.run("appointments", "p")
        result = await eng.result(handle)
        assert result.sends == 2
        summary = await handle.query("summary", result_type=RunSummary)
        left = {h.step_id: h.left_at for h in summary.history}
        assert start - timedelta(hours=24) <= left["day_before"] < start - timedelta(hours=23)
        assert start - timedelta(hours=2) <= left["two_hours_before"] < start - timedelta(hours=1)
        # Already past: both waits continue at once.
        late = await eng.result(await eng.run("appointments", "q"))
        assert late.sends == 2


async def test_wait_at_local_time_uses_the_customer_timezone(db, ts_env):
    journey = _journey("morning", [{"id": "nine", "kind": "wait", "at": "09:00"}, _send("hello")])
    async with engine(db, ts_env) as eng:
        await eng.publish(journey)
        await eng.send({**identify("t"), "context": {"timezone": "Asia/Tokyo"}})
        await eng.send(track("t", "Started"))
        handle = await eng.run("morning", "t")
        await eng.result(handle)
        summary = await handle.query("summary", result_type=RunSummary)
        until = datetime.fromisoformat(summary.results["nine"]["until"])
        local = until.astimezone(ZoneInfo("Asia/Tokyo"))
        assert (local.hour, local.minute) == (9, 0)
        assert summary.history[0].left_at >= until
