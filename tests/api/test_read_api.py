"""The read API over routed events: customers, their events, messages and journey runs, and
journey definitions. Events go in over HTTP and are routed by the real router."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.conftest import ADMIN, WRITE, WRITE_KEY
from tests.conftest import eventually
from tests.harness import Engine, engine

HELLO: dict[str, Any] = {
    "id": "hello",
    "name": "Hello",
    "entry": {"type": "track", "event": "Signed Up"},
    "steps": [
        {
            "id": "greet",
            "kind": "send",
            "template": {
                "subject": "Hi",
                "body": "Hello {{ profile.first_name | default('you') }}",
            },
        },
        {"id": "pause", "kind": "wait", "duration": "1h"},
    ],
}


async def send(api: httpx.AsyncClient, kind: str, **body: Any) -> None:
    r = await api.post(f"/v1/{kind}", json=body, auth=WRITE)
    assert r.status_code == 200, r.text


async def route(eng: Engine) -> int:
    total = 0
    while n := await eng.router.route_once():
        total += n
    return total


async def get(api: httpx.AsyncClient, path: str, **params: Any) -> Any:
    r = await api.get(path, headers=ADMIN, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, code: str, *names: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message"}, body
    assert body["code"] == code, body
    for name in names:
        assert name in body["message"], body
    return body["message"]


def ids(customer: dict[str, Any]) -> set[tuple[str, str]]:
    return {(i["kind"], i["value"]) for i in customer["identities"]}


# -- customers -------------------------------------------------------------------------


async def test_customer_by_user_id_anonymous_id_email_and_internal_id(api, db, dev_env):
    async with engine(db, dev_env) as eng:
        await send(
            api,
            "identify",
            userId="u-1",
            anonymousId="anon-x",
            traits={"email": "Ann@Example.COM", "first_name": "Ann"},
        )
        assert await route(eng) == 1
    by_user = await get(api, "/v1/customers/u-1")
    assert ids(by_user) == {("user", "u-1"), ("anonymous", "anon-x"), ("email", "ann@example.com")}
    assert by_user["traits"] == {"email": "Ann@Example.COM", "first_name": "Ann"}
    for ref in ("anon-x", "ann@example.com", "ANN@example.com", by_user["id"]):
        assert await get(api, f"/v1/customers/{ref}") == by_user, ref


async def test_unknown_customer_is_404_json(api, db):
    r = await api.get("/v1/customers/nobody", headers=ADMIN)
    assert_error(r, 404, "not_found", "nobody")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Bearer {WRITE_KEY}"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dGVzdC13cml0ZS1rZXk6"},  # the write key as Basic
    ],
    ids=["none", "write-bearer", "wrong-bearer", "write-basic"],
)
@pytest.mark.parametrize("suffix", ["", "/events", "/messages", "/journeys"])
async def test_customer_endpoints_need_the_admin_key(api, db, dev_env, headers, suffix):
    async with engine(db, dev_env) as eng:
        await send(api, "track", userId="u-1", event="e")
        await route(eng)
    r = await api.get(f"/v1/customers/u-1{suffix}", headers=headers)
    # The write key is a valid key without the `read` scope: 403; none or a wrong one: 401.
    known = "wrong" not in headers.get("Authorization", "wrong")
    assert_error(r, 403 if known else 401, "forbidden" if known else "unauthorized")


# -- identity stitching ----------------------------------------------------------------


async def test_identify_stitches_an_anonymous_visitor(api, db, dev_env):
    async with engine(db, dev_env) as eng:
        await send(api, "track", anonymousId="anon-1", event="Viewed Pricing", messageId="m-a")
        await route(eng)
        before = await get(api, "/v1/customers/anon-1")
        await send(
            api,
            "identify",
            userId="u-9",
            anonymousId="anon-1",
            traits={"plan": "pro"},
            messageId="m-i",
        )
        await route(eng)
    customer = await get(api, "/v1/customers/u-9")
    assert customer["id"] == before["id"]
    assert ids(customer) == {("user", "u-9"), ("anonymous", "anon-1")}
    assert customer["traits"] == {"plan": "pro"}
    assert (await get(api, "/v1/customers/anon-1"))["id"] == customer["id"]
    assert await db.fetchval("SELECT count(*) FROM customers") == 1
    events = (await get(api, "/v1/customers/u-9/events"))["items"]
    assert [e["message_id"] for e in events] == ["m-i", "m-a"]
    assert events[1]["event"] == "Viewed Pricing"
    assert all(e["routed"] for e in events)


async def test_stitching_in_one_routing_chunk(api, db, dev_env):
    async with engine(db, dev_env) as eng:
        await send(api, "track", anonymousId="anon-1", event="Viewed Pricing", messageId="m-a")
        await send(api, "identify", userId="u-9", anonymousId="anon-1", messageId="m-i")
        assert await route(eng) == 2
    customer = await get(api, "/v1/customers/anon-1")
    assert ids(customer) == {("user", "u-9"), ("anonymous", "anon-1")}
    events = (await get(api, "/v1/customers/u-9/events"))["items"]
    assert {e["message_id"] for e in events} == {"m-a", "m-i"}


async def test_alias_merges_an_anonymous_customer_into_a_known_one(api, db, dev_env):
    async with engine(db, dev_env) as eng:
        await send(api, "track", anonymousId="anon-2", event="Added To Cart", messageId="m-a1")
        await send(api, "page", anonymousId="anon-2", name="Cart", messageId="m-a2")
        await route(eng)
        await send(api, "identify", userId="u-10", traits={"name": "Bo"}, messageId="m-b1")
        await route(eng)
        a = await get(api, "/v1/customers/anon-2")
        b = await get(api, "/v1/customers/u-10")
        assert a["id"] != b["id"]
        await send(api, "alias", userId="u-10", previousId="anon-2", messageId="m-alias")
        await route(eng)
    merged = await get(api, "/v1/customers/anon-2")
    assert merged["id"] == b["id"]
    assert ids(merged) == {("user", "u-10"), ("anonymous", "anon-2")}
    assert (await get(api, f"/v1/customers/{a['id']}"))["id"] == b["id"]
    events = (await get(api, "/v1/customers/u-10/events"))["items"]
    assert {e["message_id"] for e in events} == {"m-a1", "m-a2", "m-b1", "m-alias"}


async def test_customer_merged_twice_leads_to_the_last_survivor(api, db, dev_env):
    """A merged into B, then B merged into C: A's old id must lead to C, not to dead B."""
    async with engine(db, dev_env) as eng:
        await send(api, "track", anonymousId="anon-3", event="e", messageId="m-a")
        await send(api, "identify", userId="u-b", messageId="m-b")
        await send(api, "identify", userId="u-c", messageId="m-c")
        await route(eng)
        a = (await get(api, "/v1/customers/anon-3"))["id"]
        b = (await get(api, "/v1/customers/u-b"))["id"]
        c = (await get(api, "/v1/customers/u-c"))["id"]
        await send(api, "alias", userId="u-b", previousId="anon-3", messageId="m-ab")
        await route(eng)
        await send(api, "alias", userId="u-c", previousId="u-b", messageId="m-bc")
        await route(eng)
    assert (await get(api, "/v1/customers/u-b"))["id"] == c
    assert (await get(api, "/v1/customers/anon-3"))["id"] == c
    assert (await get(api, f"/v1/customers/{b}"))["id"] == c
    via_a = await get(api, f"/v1/customers/{a}")
    assert via_a["id"] == c
    assert ("anonymous", "anon-3") in ids(via_a)


async def test_identify_traits_merge(api, db, dev_env):
    async with engine(db, dev_env) as eng:
        await send(api, "identify", userId="u-1", traits={"plan": "free", "first_name": "Ann"})
        await route(eng)
        await send(api, "identify", userId="u-1", traits={"plan": "pro", "company": "Initech"})
        await route(eng)
    customer = await get(api, "/v1/customers/u-1")
    assert customer["traits"] == {"plan": "pro", "first_name": "Ann", "company": "Initech"}


async def test_identify_traits_merge_in_order_within_one_chunk(api, db, dev_env):
    async with engine(db, dev_env) as eng:
        await send(api, "identify", userId="u-1", traits={"plan": "free", "first_name": "Ann"})
        await send(api, "identify", userId="u-1", traits={"plan": "pro"})
        await send(api, "track", userId="u-1", event="e", traits={"plan": "ignored"})
        assert await route(eng) == 3
    customer = await get(api, "/v1/customers/u-1")
    assert customer["traits"] == {"plan": "pro", "first_name": "Ann"}


@pytest.mark.parametrize(
    "odd",
    [
        {"traits": {"email": "x" * 600 + "@example.com"}},
        {"context": {"timezone": "Mars/" + "x" * 100}},
    ],
    ids=["long-email", "long-timezone"],
)
async def test_one_odd_identify_does_not_stop_routing(api, db, dev_env, odd):
    """An accepted event the profile tables cannot hold must not block every later event."""
    async with engine(db, dev_env) as eng:
        await send(api, "identify", userId="u-odd", messageId="m-odd", **odd)
        await send(api, "track", userId="u-2", event="e", messageId="m-2")
        await route(eng)
    assert (await get(api, "/v1/customers/u-2"))["id"]
    assert await db.fetchval("SELECT count(*) FROM events WHERE routed_at IS NULL") == 0


# -- events pages ----------------------------------------------------------------------


async def test_events_pagination(api, db, dev_env):
    async with engine(db, dev_env) as eng:
        for i in range(5):
            await send(api, "track", userId="u-1", event=f"E{i}", messageId=f"m{i}")
        await route(eng)
    first = await get(api, "/v1/customers/u-1/events", limit=2)
    assert [e["message_id"] for e in first["items"]] == ["m4", "m3"]
    assert first["next_before"] is not None
    rest = await get(api, "/v1/customers/u-1/events", before=first["next_before"])
    assert [e["message_id"] for e in rest["items"]] == ["m2", "m1", "m0"]
    assert rest["next_before"] is None
    second = await get(api, "/v1/customers/u-1/events", limit=2, before=first["next_before"])
    assert [e["message_id"] for e in second["items"]] == ["m2", "m1"]
    third = await get(api, "/v1/customers/u-1/events", limit=2, before=second["next_before"])
    assert [e["message_id"] for e in third["items"]] == ["m0"]
    assert third["next_before"] is None


async def test_events_pagination_with_client_timestamps_out_of_order(api, db, dev_env):
    """Clients send `timestamp` (offline queues, backfills): pages follow the listed order."""
    stamps = {"m1": "2024-01-01T10:03:00Z", "m2": "2024-01-01T10:01:00Z",
              "m3": "2024-01-01T10:02:00Z", "m4": "2024-01-01T10:00:00Z"}  # fmt: skip
    async with engine(db, dev_env) as eng:
        batch = [
            {"type": "track", "userId": "u-1", "event": "e", "messageId": m, "timestamp": ts}
            for m, ts in stamps.items()
        ]
        r = await api.post("/v1/batch", json={"batch": batch}, auth=WRITE)
        assert r.status_code == 200
        await route(eng)
    everything = await get(api, "/v1/customers/u-1/events")
    assert [e["message_id"] for e in everything["items"]] == ["m1", "m3", "m2", "m4"]
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    for _ in range(5):
        page = await get(api, "/v1/customers/u-1/events", **params)
        seen += [e["message_id"] for e in page["items"]]
        if page["next_before"] is None:
            break
        params["before"] = page["next_before"]
    assert seen == ["m1", "m3", "m2", "m4"]


@pytest.mark.parametrize("limit", [0, 5000, -1])
@pytest.mark.parametrize("suffix", ["/events", "/messages"])
async def test_bad_limit_is_400_naming_limit(api, db, dev_env, limit, suffix):
    async with engine(db, dev_env) as eng:
        await send(api, "track", userId="u-1", event="e")
        await route(eng)
    r = await api.get(f"/v1/customers/u-1{suffix}", headers=ADMIN, params={"limit": limit})
    assert_error(r, 400, "invalid_request", "limit")


async def test_events_of_unknown_customer_is_404(api, db):
    for suffix in ("/events", "/messages", "/journeys"):
        r = await api.get(f"/v1/customers/nobody{suffix}", headers=ADMIN)
        assert_error(r, 404, "not_found", "nobody")


# -- messages and journey runs ----------------------------------------------------------


async def test_messages_and_journey_runs(api, db, dev_env):
    async with engine(db, dev_env) as eng:
        r = await api.post("/v1/journeys", json=HELLO, headers=ADMIN)
        assert r.status_code == 200, r.text
        eng.router._journeys_stale = True
        await send(api, "identify", userId="u-1", traits={"first_name": "Ann"})
        await send(api, "track", userId="u-1", event="Signed Up", messageId="m-signup")
        await route(eng)

        async def sent() -> Any:
            return await db.fetchrow("SELECT * FROM messages WHERE status = 'sent'")

        await eventually(sent, what="the greeting to be sent")
        messages = await get(api, "/v1/customers/u-1/messages")
        assert messages["next_before"] is None
        [m] = messages["items"]
        assert m["status"] == "sent"
        assert m["sent_at"] is not None
        assert (m["journey_id"], m["journey_version"], m["step_id"]) == ("hello", 1, "greet")
        assert (m["channel"], m["subject"], m["body"]) == ("outbox", "Hi", "Hello Ann")

        async def paused() -> Any:
            runs = await get(api, "/v1/customers/u-1/journeys")
            return runs if runs and runs[0]["current_step"] == "pause" else None

        [run] = await eventually(paused, what="the run to reach the wait step")
        assert run["journey_id"] == "hello"
        assert run["version"] == 1
        assert run["status"] == "running"
        assert run["step_deadline"] is not None
        assert run["ended_at"] is None
        assert [h["step_id"] for h in run["history"]] == ["greet", "pause"]
        assert [h["kind"] for h in run["history"]] == ["send", "wait"]
        assert run["history"][0]["left_at"] is not None
        assert run["history"][1]["left_at"] is None
        journeys = await get(api, "/v1/journeys")
        assert [(j["id"], j["live_runs"]) for j in journeys] == [("hello", 1)]


async def test_no_messages_or_runs_for_a_customer_outside_journeys(api, db, dev_env):
    async with engine(db, dev_env) as eng:
        await send(api, "track", userId="u-1", event="Other")
        await route(eng)
    assert await get(api, "/v1/customers/u-1/messages") == {"items": [], "next_before": None}
    assert await get(api, "/v1/customers/u-1/journeys") == []


# -- journey definitions ---------------------------------------------------------------


def with_steps(*steps: dict[str, Any]) -> dict[str, Any]:
    return {**HELLO, "steps": list(steps)}


INVALID = {
    "unknown-kind": (with_steps({"id": "shout", "kind": "shout"}), "shout"),
    "missing-next": (
        with_steps(
            {"id": "greet", "kind": "send", "template": {"body": "x"}, "next": "nowhere"},
            {"id": "pause", "kind": "wait", "duration": "1h"},
        ),
        "greet",
    ),
    "duplicate-id": (
        with_steps(
            {"id": "pause", "kind": "wait", "duration": "1h"},
            {"id": "pause", "kind": "wait", "duration": "2h"},
        ),
        "pause",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
async def test_invalid_definition_is_400_naming_the_step(api, db, case):
    definition, step = INVALID[case]
    r = await api.post("/v1/journeys", json=definition, headers=ADMIN)
    msg = assert_error(r, 400, "invalid_definition", f"step {step!r}")
    if case == "missing-next":
        assert "nowhere" in msg
    if case == "duplicate-id":
        assert "duplicate" in msg
    assert await db.fetchval("SELECT count(*) FROM journeys") == 0
    assert await get(api, "/v1/journeys") == []


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": f"Bearer {WRITE_KEY}"}, {"Authorization": "Bearer wrong"}],
    ids=["none", "write-key", "wrong"],
)
async def test_journeys_need_the_admin_key(api, db, headers):
    # The write key is a valid key without the `manage`/`read` scopes: 403; none or wrong: 401.
    status, code = (403, "forbidden") if WRITE_KEY in str(headers) else (401, "unauthorized")
    r = await api.post("/v1/journeys", json=HELLO, headers=headers)
    assert_error(r, status, code)
    r = await api.get("/v1/journeys", headers=headers)
    assert_error(r, status, code)
    r = await api.get("/v1/journeys/hello", headers=headers)
    assert_error(r, status, code)
    assert await db.fetchval("SELECT count(*) FROM journeys") == 0


async def test_publish_list_and_versions(api, db):
    r = await api.post("/v1/journeys", json=HELLO, headers=ADMIN)
    assert r.status_code == 200, r.text
    published = r.json()
    assert published["id"] == "hello"
    assert published["name"] == "Hello"
    assert published["status"] == "active"
    assert published["current_version"] == 1
    assert published["live_runs"] == 0
    assert published["definition"]["steps"][0]["id"] == "greet"
    assert published["definition"]["version"] == 1

    assert await get(api, "/v1/journeys") == [published]
    assert await get(api, "/v1/journeys/hello") == published

    again = await api.post("/v1/journeys", json=HELLO, headers=ADMIN)
    assert again.status_code == 200
    assert again.json()["current_version"] == 1
    assert await db.fetchval("SELECT count(*) FROM journey_versions") == 1

    changed = with_steps(HELLO["steps"][0], {"id": "pause", "kind": "wait", "duration": "2h"})
    r = await api.post("/v1/journeys", json=changed, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["current_version"] == 2
    assert r.json()["definition"]["steps"][1]["duration"] == "2h"
    [listed] = await get(api, "/v1/journeys")
    assert listed["current_version"] == 2
    assert await db.fetchval("SELECT count(*) FROM journey_versions") == 2


async def test_unknown_journey_is_404(api, db):
    r = await api.get("/v1/journeys/nope", headers=ADMIN)
    assert_error(r, 404, "not_found", "nope")
