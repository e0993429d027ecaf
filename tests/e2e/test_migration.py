"""Explicit migration of customers in flight between versions: dry run, then move by mapping."""

from __future__ import annotations

from models.runtime import RunSummary
from tests.conftest import eventually
from tests.harness import ADMIN, Engine, identify, track


def _version(body: str, extra_step: bool = False) -> dict:
    steps = [
        {"id": "hello", "kind": "send", "template": {"body": f"{body} hello"}},
        {"id": "long_wait", "kind": "wait", "duration": "30d"},
        {"id": "bye", "kind": "send", "template": {"body": f"{body} bye"}},
    ]
    if extra_step:
        steps.insert(2, {"id": "bonus", "kind": "send", "template": {"body": f"{body} bonus"}})
    return {"id": "promo", "name": "Promo", "entry": {"event": "Joined"}, "steps": steps}


async def _at(eng: Engine, user: str, step: str) -> RunSummary:
    """Wait until the user's run is at `step`."""
    handle = await eng.run("promo", user)

    async def there() -> RunSummary | None:
        s = await handle.query("summary", result_type=RunSummary)
        return s if s.step_id == step else None

    return await eventually(there, what=f"{user} at {step}")


async def test_dry_run_counts_then_mapping_moves_waiting_customers(desk):
    eng, api = desk
    await api.put("/v1/journeys/promo/draft", json=_version("v1"), headers=ADMIN)
    await api.post("/v1/journeys/promo/publish", headers=ADMIN)
    eng.router._journeys_stale = True
    for user in ("m1", "m2"):
        await eng.send(identify(user), track(user, "Joined"))
        await _at(eng, user, "long_wait")
    await api.put("/v1/journeys/promo/draft", json=_version("v2", extra_step=True), headers=ADMIN)
    await api.post("/v1/journeys/promo/publish", headers=ADMIN)

    plan = {"from_version": 1, "step_map": {"long_wait": "bonus"}, "reason": "new bonus"}
    dry = (await api.post("/v1/journeys/promo/migrate", json=plan, headers=ADMIN)).json()
    assert (dry["dry_run"], dry["would_move"], dry["moved"]) == (True, {"long_wait": 2}, 0)
    assert (await _at(eng, "m1", "long_wait")).version == 1  # a dry run moves nobody

    bad = {**plan, "step_map": {"long_wait": "nowhere"}, "dry_run": False}
    r = await api.post("/v1/journeys/promo/migrate", json=bad, headers=ADMIN)
    assert (r.status_code, r.json()["code"]) == (400, "invalid_request")
    assert "nowhere" in r.json()["message"]

    real = {**plan, "dry_run": False}
    done = (await api.post("/v1/journeys/promo/migrate", json=real, headers=ADMIN)).json()
    assert (done["moved"], done["failed"]) == (2, 0)
    handle = await eng.run("promo", "m1")
    result = await handle.result()  # v2 goes on from `bonus` to `bye`: no 30-day wait left
    assert result.steps == ["hello", "long_wait", "bonus", "bye"]
    summary = await handle.query("summary", result_type=RunSummary)
    assert summary.version == 2
    assert [(s.action, s.from_version, s.from_step) for s in summary.steered] == [
        ("migrate", 1, "long_wait")
    ]
    assert [m["body"] for m in await eng.messages("m1")] == ["v1 hello", "v2 bonus", "v2 bye"]
    rows = await eng.pool.fetch("SELECT DISTINCT journey_version FROM journey_runs")
    assert [r["journey_version"] for r in rows] == [2]
