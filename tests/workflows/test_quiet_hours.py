"""Quiet hours: the send waits on a durable timer until the window ends, or is skipped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from activities.waits import quiet_until
from models.runtime import RunSummary
from tests.harness import engine, identify, track


def _journey(jid: str, start: str, end: str, mode: str) -> dict:
    return {
        "id": jid,
        "name": jid,
        "entry": {"event": "Started"},
        "steps": [
            {"id": "hello", "kind": "send", "template": {"body": "hi"},
             "quiet_hours": {"start": start, "end": end, "mode": mode}},
        ],
    }  # fmt: skip


def test_quiet_window_arithmetic():
    at = datetime(2026, 11, 27, 22, 30, tzinfo=UTC)
    assert quiet_until(at, "21:00", "08:00", None) == datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
    early = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
    assert quiet_until(early, "21:00", "08:00", None) == datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
    assert quiet_until(datetime(2026, 11, 28, 12, 0, tzinfo=UTC), "21:00", "08:00", None) is None
    tokyo = quiet_until(datetime(2026, 11, 28, 13, 0, tzinfo=UTC), "21:00", "08:00", "Asia/Tokyo")
    assert tokyo is not None  # 22:00 in Tokyo
    assert tokyo.astimezone(ZoneInfo("Asia/Tokyo")).hour == 8


async def test_a_send_in_quiet_hours_waits_for_the_window_to_end(db, ts_env):
    now = await ts_env.get_current_time()
    start = (now - timedelta(hours=1)).strftime("%H:%M")
    end = (now + timedelta(hours=2)).strftime("%H:%M")
    async with engine(db, ts_env) as eng:
        await eng.publish(_journey("quiet_wait", start, end, "wait"))
        await eng.publish(_journey("quiet_skip", start, end, "skip"))
        await eng.send(identify("night"), track("night", "Started"))
        waited = await eng.run("quiet_wait", "night")
        await eng.result(waited)
        summary = await waited.query("summary", result_type=RunSummary)
        (step,) = summary.history
        assert step.left_at - step.entered_at >= timedelta(hours=1, minutes=55)
        assert summary.results["hello"]["status"] == "sent"
        await eng.result(await eng.run("quiet_skip", "night"))
        rows = {
            m["journey_id"]: (m["status"], m["skip_reason"]) for m in await eng.messages("night")
        }
        assert rows == {"quiet_wait": ("sent", None), "quiet_skip": ("skipped", "quiet_hours")}
