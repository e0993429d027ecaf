"""Marketer lifecycle: drafts, dry validation, publish, versions pinned in flight, pause
(hold or exit), resume, archive."""

from __future__ import annotations

from models.runtime import RunSummary
from tests.conftest import eventually
from tests.harness import ADMIN, Engine, identify, track


def _v(body: str, wait: str = "30d") -> dict:
    return {
        "id": "promo",
        "name": "Promo",
        "entry": {"event": "Joined"},
        "exit_on": [{"event": "Unsubscribed"}],
        "steps": [
            {"id": "first", "kind": "send", "template": {"body": body}},
            {"id": "pause_a_while", "kind": "wait", "duration": wait},
            {"id": "second", "kind": "send", "template": {"body": f"{body} again"}},
        ],
    }


async def _step(eng: Engine, user: str) -> RunSummary:
    return await (await eng.run("promo", user)).query("summary", result_type=RunSummary)


async def _waiting(eng: Engine, user: str) -> RunSummary:
    async def there() -> RunSummary | None:
        s = await _step(eng, user)
        return s if s.step_id == "pause_a_while" else None

    return await eventually(there, what=f"{user} waiting")


async def test_draft_validate_publish_and_versions_in_flight(desk):
    eng, api = desk
    broken = {**_v("v1"), "steps": [{"id": "first", "kind": "send"}]}
    r = await api.put("/v1/journeys/promo/draft", json=broken, headers=ADMIN)
    assert r.status_code == 200
    assert r.json()["valid"] is False
    assert "step 'first'" in r.json()["errors"][0]
    assert (await api.post("/v1/journeys/promo/publish", headers=ADMIN)).status_code == 400
    listed = (await api.get("/v1/journeys/promo", headers=ADMIN)).json()
    assert (listed["status"], listed["has_draft"], listed["versions"]) == ("draft", True, [])

    dry = await api.post("/v1/journeys/promo/validate", json=_v("v1"), headers=ADMIN)
    assert dry.json() == {"valid": True, "errors": [], "warnings": []}
    assert (await api.get("/v1/journeys/promo/draft", headers=ADMIN)).json() == {
        **broken,
        "id": "promo",
    }  # a dry validation stores nothing

    assert (await api.put("/v1/journeys/promo/draft", json=_v("v1"), headers=ADMIN)).json()["valid"]
    r = await api.post("/v1/journeys/promo/publish", headers=ADMIN)
    assert (r.json()["status"], r.json()["current_version"], r.json()["has_draft"]) == (
        "active", 1, False,
    )  # fmt: skip
    eng.router._journeys_stale = True
    await eng.send(identify("early"), track("early", "Joined"))
    await _waiting(eng, "early")

    await api.put("/v1/journeys/promo/draft", json=_v("v2", wait="1s"), headers=ADMIN)
    assert (await api.post("/v1/journeys/promo/publish", headers=ADMIN)).json()[
        "current_version"
    ] == 2
    eng.router._journeys_stale = True
    await eng.send(identify("late"), track("late", "Joined"))
    late = await (await eng.run("promo", "late")).result()
    assert late.status == "completed"
    assert [m["body"] for m in await eng.messages("late")] == ["v2", "v2 again"]
    # The early customer is still on version 1: same 30-day wait, v1 texts.
    early = await _step(eng, "early")
    assert (early.version, early.step_id) == (1, "pause_a_while")
    assert [m["body"] for m in await eng.messages("early")] == ["v1"]
    versions = (await api.get("/v1/journeys/promo", headers=ADMIN)).json()["versions"]
    assert [(v["version"], v["live_runs"]) for v in versions] == [(1, 1), (2, 0)]


async def test_pause_holds_then_resume_releases_and_exit_option(desk):
    eng, api = desk
    await api.put("/v1/journeys/promo/draft", json=_v("hi", wait="2s"), headers=ADMIN)
    await api.post("/v1/journeys/promo/publish", headers=ADMIN)
    eng.router._journeys_stale = True
    await eng.send(identify("a"), track("a", "Joined"))
    await _waiting(eng, "a")
    r = await api.post("/v1/journeys/promo/pause", json={"in_flight": "hold"}, headers=ADMIN)
    assert r.json() == {"id": "promo", "status": "paused", "runs_affected": 1}
    # No new entries while paused; the held customer does not take the next step.
    eng.router._journeys_stale = True
    await eng.send(identify("b"), track("b", "Joined"))
    assert await db_runs(eng, "b") == 0

    async def held_past_deadline() -> bool:
        s = await _step(eng, "a")
        return s.held and s.step_deadline is not None

    await eventually(held_past_deadline, what="the run to be held")
    r = await api.post("/v1/journeys/promo/resume", headers=ADMIN)
    assert r.json()["runs_affected"] == 1
    result = await (await eng.run("promo", "a")).result()
    assert result.status == "completed"
    assert [m["body"] for m in await eng.messages("a")] == ["hi", "hi again"]

    eng.router._journeys_stale = True
    await eng.send(track("b", "Joined"))
    await _waiting(eng, "b")
    r = await api.post(
        "/v1/journeys/promo/pause",
        json={"in_flight": "exit", "reason": "offer withdrawn"},
        headers=ADMIN,
    )
    assert r.json()["runs_affected"] == 1
    gone = await (await eng.run("promo", "b")).result()
    assert (gone.status, gone.exit_reason) == ("exited", "operator: offer withdrawn")

    r = await api.post("/v1/journeys/promo/archive", headers=ADMIN)
    assert r.json()["status"] == "archived"
    assert (await api.post("/v1/journeys/promo/resume", headers=ADMIN)).status_code == 409
    assert (await api.post("/v1/journeys/nope/pause", headers=ADMIN)).status_code == 404


async def db_runs(eng: Engine, user: str) -> int:
    cid = await eng.customer(user)
    return await eng.pool.fetchval("SELECT count(*) FROM journey_runs WHERE customer_id = $1", cid)
