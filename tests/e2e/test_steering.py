"""Operators steer runs in flight through workflow updates (dev server, in-process API)."""

from __future__ import annotations

import httpx
import pytest

from models.runtime import RunSummary
from tests.conftest import eventually
from tests.harness import ADMIN, Engine, identify, track

JOURNEY = {
    "id": "steerable",
    "name": "Steerable",
    "entry": {"event": "Started"},
    "steps": [
        {"id": "long_wait", "kind": "wait", "duration": "30d"},
        {"id": "after_wait", "kind": "send", "template": {"body": "after the wait"}},
        {"id": "await_click", "kind": "wait_for", "timeout": "30d",
         "events": [{"event": "Clicked"}]},
        {"id": "final", "kind": "send", "template": {"body": "final"}},
    ],
}  # fmt: skip


@pytest.fixture
async def steer_env(desk) -> tuple[Engine, httpx.AsyncClient]:
    eng, api = desk
    await eng.publish(JOURNEY)
    return eng, api


async def _at_step(eng: Engine, user: str, step: str | None) -> RunSummary:
    handle = await eng.run("steerable", user)

    async def there() -> RunSummary | None:
        summary = await handle.query("summary", result_type=RunSummary)
        return summary if summary.step_id == step else None

    return await eventually(there, what=f"{user} at {step}")


async def test_skip_then_move_then_runs_show_it(steer_env):
    eng, api = steer_env
    await eng.send(identify("op1"), track("op1", "Started"))
    await _at_step(eng, "op1", "long_wait")
    url = "/v1/customers/op1/journeys/steerable/steer"
    r = await api.post(url, json={"action": "skip", "reason": "support ticket 42"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    await _at_step(eng, "op1", "await_click")
    assert [m["body"] for m in await eng.messages("op1")] == ["after the wait"]

    r = await api.post(
        url, json={"action": "move", "step_id": "final", "reason": "vip"}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    result = await (await eng.run("steerable", "op1")).result()
    assert result.status == "completed"
    assert [m["body"] for m in await eng.messages("op1")] == ["after the wait", "final"]

    runs = (await api.get("/v1/customers/op1/journeys", headers=ADMIN)).json()
    steered = runs[0]["steered"]
    assert [(s["action"], s["from_step"], s["reason"]) for s in steered] == [
        ("skip", "long_wait", "support ticket 42"),
        ("move", "await_click", "vip"),
    ]
    assert runs[0]["results"]["long_wait"] == {"outcome": "skipped", "reason": "support ticket 42"}


async def test_exit_and_invalid_instructions(steer_env):
    eng, api = steer_env
    await eng.send(identify("op2"), track("op2", "Started"))
    await _at_step(eng, "op2", "long_wait")
    url = "/v1/customers/op2/journeys/steerable/steer"
    bad = await api.post(
        url, json={"action": "move", "step_id": "nowhere", "reason": "x"}, headers=ADMIN
    )
    assert (bad.status_code, bad.json()["code"]) == (409, "rejected")
    assert "nowhere" in bad.json()["message"]
    no_reason = await api.post(url, json={"action": "exit"}, headers=ADMIN)
    assert no_reason.status_code == 400
    assert "reason" in no_reason.json()["message"]
    r = await api.post(url, json={"action": "exit", "reason": "asked to stop"}, headers=ADMIN)
    assert r.status_code == 200
    result = await (await eng.run("steerable", "op2")).result()
    assert (result.status, result.exit_reason) == ("exited", "operator: asked to stop")
    assert await eng.messages("op2") == []
    gone = await api.post(url, json={"action": "exit", "reason": "again"}, headers=ADMIN)
    assert gone.status_code == 404
