"""Lists people expect: a journey's runs (status, version, current step), customers by userId,
email and trait, audience launches; keyset-paged, and bad input answered `{code, message}`.

Runs are made by the real router and worker on the dev server (the current step comes from
Temporal visibility); customers by identify events; launches are rows as the launch route
writes them."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.conftest import eventually
from tests.harness import ADMIN, identify, track

HOLD: dict[str, Any] = {
    "id": "hold_list",
    "name": "Hold",
    "entry": {"type": "track", "event": "Go"},
    "steps": [
        {"id": "first_wait", "kind": "wait", "duration": "1d"},
        {"id": "second_wait", "kind": "wait", "duration": "1d"},
    ],
}


async def _get(api: httpx.AsyncClient, path: str, **params: Any) -> Any:
    r = await api.get(path, headers=ADMIN, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def _all_pages(api: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await _get(api, path, **params, **({"cursor": cursor} if cursor else {}))
        assert len(page["items"]) <= params.get("limit", 50)
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def _error(r: httpx.Response, status: int, code: str, name: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message"} and body["code"] == code, body
    assert name in body["message"], body


async def test_runs_of_a_journey_filter_by_status_version_and_step_and_page(desk) -> None:
    eng, api = desk
    await eng.publish(HOLD)
    await eng.send(*(track(f"v1-{i}", "Go") for i in range(3)))
    await eng.publish({**HOLD, "name": "Hold v2"})
    await eng.send(*(track(f"v2-{i}", "Go") for i in range(2)))
    # One run of version 1 ends (exited), so status filters have something to tell apart.
    exited = await eng.customer("v1-0")
    await eng.pool.execute(
        "UPDATE journey_runs SET status = 'exited', exit_reason = 'test', ended_at = now() "
        "WHERE customer_id = $1",
        exited,
    )

    runs = await _all_pages(api, "/v1/journeys/hold_list/runs", limit=2)
    assert len(runs) == 5 and len({r["enrollment_id"] for r in runs}) == 5
    assert [r["started_at"] for r in runs] == sorted((r["started_at"] for r in runs), reverse=True)
    assert {r["version"] for r in runs} == {1, 2}

    v1 = await _all_pages(api, "/v1/journeys/hold_list/runs", version=1)
    assert sorted(r["customer_id"] for r in v1) == sorted(
        [await eng.customer(f"v1-{i}") for i in range(3)]
    )
    exited_runs = (await _get(api, "/v1/journeys/hold_list/runs", status="exited"))["items"]
    assert [r["customer_id"] for r in exited_runs] == [exited]
    assert exited_runs[0]["current_step"] is None and exited_runs[0]["exit_reason"] == "test"

    # The current step: journey_runs does not store it; Temporal's visibility has it.
    async def steps_shown() -> list[dict[str, Any]] | None:
        page = await _get(api, "/v1/journeys/hold_list/runs", status="running")
        shown = [r["current_step"] for r in page["items"]]
        return page["items"] if shown == ["first_wait"] * 4 else None

    assert len(await eventually(steps_shown, what="current steps from visibility")) == 4

    async def at_step() -> list[dict[str, Any]] | None:
        page = await _get(api, "/v1/journeys/hold_list/runs", step="first_wait", version=2)
        return page["items"] if len(page["items"]) == 2 else None

    at = await eventually(at_step, what="step filter")
    assert {r["customer_id"] for r in at} == {await eng.customer(f"v2-{i}") for i in range(2)}
    assert (await _get(api, "/v1/journeys/hold_list/runs", step="second_wait"))["items"] == []


async def test_runs_refuse_bad_input_with_code_and_message(desk) -> None:
    eng, api = desk
    await eng.publish(HOLD)
    path = "/v1/journeys/hold_list/runs"
    _error(await api.get("/v1/journeys/nope/runs", headers=ADMIN), 404, "not_found", "nope")
    for params, name in (
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"version": 2**31}, "version"),
        ({"status": "sleeping"}, "status"),
        ({"step": "x' OR 'a'='a"}, "step"),
    ):
        _error(await api.get(path, headers=ADMIN, params=params), 400, "invalid_request", name)
    assert (await api.get(path)).status_code == 401


async def test_customers_search_by_user_id_email_and_traits_paged(desk) -> None:
    eng, api = desk
    await eng.send(
        identify("u-ann", email="Ann@Example.com", plan="pro", seats=3),
        identify("u-bob", email="bob@example.com", plan="free"),
        identify("u-cid", plan="pro", region="eu"),
        *(identify(f"u-many-{i}", plan="trial") for i in range(5)),
    )
    ann = await eng.customer("u-ann")

    everyone = await _all_pages(api, "/v1/customers", limit=3)
    assert len(everyone) == 8 and len({c["id"] for c in everyone}) == 8

    by_user = (await _get(api, "/v1/customers", userId="u-ann"))["items"]
    assert [c["id"] for c in by_user] == [ann]
    assert {"kind": "user", "value": "u-ann"} in by_user[0]["identities"]
    assert by_user[0]["traits"]["plan"] == "pro"
    by_email = (await _get(api, "/v1/customers", email="ANN@example.COM"))["items"]
    assert [c["id"] for c in by_email] == [ann]

    pro = {c["id"] for c in (await _get(api, "/v1/customers", **{"trait.plan": "pro"}))["items"]}
    assert pro == {ann, await eng.customer("u-cid")}
    same = {c["id"] for c in (await _get(api, "/v1/customers", trait="plan:pro"))["items"]}
    assert same == pro
    both = await _get(api, "/v1/customers", **{"trait.plan": "pro", "trait.region": "eu"})
    assert [c["id"] for c in both["items"]] == [await eng.customer("u-cid")]
    seats = await _get(api, "/v1/customers", trait="seats:3")  # numbers by their text form
    assert [c["id"] for c in seats["items"]] == [ann]
    assert (await _get(api, "/v1/customers", userId="nobody"))["items"] == []

    for params, name in (
        ({"trait": "plan"}, "trait"),
        ({"trait.": "x"}, "trait."),
        ({"cursor": "e30"}, "cursor"),  # base64 of {}
        ({"limit": 10_000}, "limit"),
    ):
        r = await api.get("/v1/customers", headers=ADMIN, params=params)
        _error(r, 400, "invalid_request", name)


async def test_launches_listed_newest_first_filtered_and_paged(desk) -> None:
    eng, api = desk
    await eng.publish(HOLD)
    await eng.publish({**HOLD, "id": "other_list"})
    for i in range(5):
        await eng.pool.execute(
            "INSERT INTO launches (id, journey_id, rate_per_second, page_size, status, created_at) "
            "VALUES ($1, $2, 10, 100, $3, now() - make_interval(mins => $4))",
            f"l{i}-{uuid.uuid4().hex[:6]}",
            "hold_list" if i % 2 == 0 else "other_list",
            "completed" if i < 2 else "running",
            i,
        )
    every = await _all_pages(api, "/v1/launches", limit=2)
    assert [launch["id"][:2] for launch in every] == ["l0", "l1", "l2", "l3", "l4"]
    hold = await _all_pages(api, "/v1/launches", journey_id="hold_list")
    assert [launch["id"][:2] for launch in hold] == ["l0", "l2", "l4"]
    done = await _get(api, "/v1/launches", status="completed", journey_id="hold_list")
    assert [launch["id"][:2] for launch in done["items"]] == ["l0"]
    _error(
        await api.get("/v1/launches", headers=ADMIN, params={"status": "x"}),
        400,
        "invalid_request",
        "status",
    )
