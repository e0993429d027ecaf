"""A hand-off's `notify_url` is bounded like the webhook step: a 4xx is an answer (the step's
`on_error`, else a recorded failure, never retried); 5xx and timeouts are retried with backoff
and with one key, up to NOTIFY_ATTEMPTS, then recorded as failed. The task exists either way."""

from __future__ import annotations

from typing import Any

import pytest

from activities.journey_activities import NOTIFY_ATTEMPTS
from models.journey import JourneyDefinition
from models.runtime import RunSummary
from store.journeys import parse_definition
from tests.harness import engine, identify, track
from tests.receiver import Receiver


def _journey(url: str, *, on_error: bool) -> dict[str, Any]:
    handoff: dict[str, Any] = {
        "id": "call", "kind": "handoff", "queue": "sales", "title": "Call {{ profile.name }}",
        "notify_url": url, "next": "after",
    }  # fmt: skip
    steps = [
        handoff,
        {"id": "after", "kind": "send", "template": {"body": "we will call"}, "next": "end"},
    ]
    if on_error:
        handoff["on_error"] = "notify_failed"
        steps.append({"id": "notify_failed", "kind": "send", "template": {"body": "failed"}})
    return {
        "id": "vip_notify",
        "name": "VIP hand-off",
        "entry": {"event": "Big Cart"},
        "steps": steps,
    }


async def _run(eng, ref: str) -> tuple[list[str], dict[str, Any]]:
    await eng.send(identify(ref, name=ref.title()), track(ref, "Big Cart"))
    handle = await eng.run("vip_notify", ref)
    result = await eng.result(handle)
    summary = await handle.query("summary", result_type=RunSummary)
    return result.steps, summary.results["call"]


async def test_a_4xx_goes_to_on_error_and_is_not_retried(db, ts_env, receiver):
    async with engine(db, ts_env) as eng:
        await eng.publish(_journey(f"{receiver}/reject", on_error=True))
        steps, call = await _run(eng, "ann")
        assert steps == ["call", "notify_failed"]
        assert len(Receiver.calls) == 1  # an answer, not retried
        assert call["notify"]["ok"] is False and call["notify"]["status"] == 422
        assert await db.fetchval("SELECT count(*) FROM tasks WHERE id = $1", call["task_id"]) == 1


async def test_a_4xx_without_on_error_is_recorded_and_the_run_goes_on(db, ts_env, receiver):
    async with engine(db, ts_env) as eng:
        await eng.publish(_journey(f"{receiver}/reject", on_error=False))
        steps, call = await _run(eng, "bob")
        assert steps == ["call", "after"]
        assert len(Receiver.calls) == 1
        assert call["notify"] == {"ok": False, "status": 422, "error": call["notify"]["error"]}
        assert "422" in call["notify"]["error"]


async def test_5xx_is_retried_with_one_key_then_recorded_as_failed(db, ts_env, receiver):
    async with engine(db, ts_env) as eng:
        Receiver.flaky_left = 2  # two 503s, then a 200
        await eng.publish(_journey(f"{receiver}/flaky", on_error=True))
        steps, call = await _run(eng, "cy")
        assert steps == ["call", "after"]
        assert call["notify"] == {"ok": True, "status": 200}
        assert len(Receiver.calls) == 3
        assert len({c["key"] for c in Receiver.calls}) == 1

        Receiver.calls = []
        Receiver.flaky_left = 1000  # never recovers
        steps, call = await _run(eng, "dee")
        assert steps == ["call", "notify_failed"]
        assert len(Receiver.calls) == NOTIFY_ATTEMPTS
        assert call["notify"]["ok"] is False and call["notify"]["status"] == 503
        assert await db.fetchval("SELECT count(*) FROM tasks WHERE id = $1", call["task_id"]) == 1


def test_on_error_needs_a_notify_url() -> None:
    defn = _journey("http://example.com/n", on_error=True)
    assert isinstance(parse_definition(defn), JourneyDefinition)
    del defn["steps"][0]["notify_url"]
    with pytest.raises(ValueError, match="on_error goes with notify_url"):
        parse_definition(defn)
