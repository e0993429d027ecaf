"""Dead letters through the API: listed, read, replayed after a fix (admin key)."""

from __future__ import annotations

import store.profiles as profiles_module
from tests.conftest import eventually
from tests.e2e.test_routing_faults import GREETER, insert_raw
from tests.harness import ADMIN, identify, track


async def test_dead_letters_are_listed_read_and_replayed(desk):
    eng, api = desk
    await eng.publish(GREETER)
    bad = [await insert_raw(eng, track(f"dl-{i}", "Started"), "'-infinity'") for i in range(3)]
    await eng.send(identify("dl-ok"), track("dl-ok", "Started"))

    assert (await api.get("/v1/dead-letters")).status_code == 401
    page = (await api.get("/v1/dead-letters?limit=2", headers=ADMIN)).json()
    assert [d["event_id"] for d in page["items"]] == [bad[2], bad[1]]  # newest first
    rest = (
        await api.get(f"/v1/dead-letters?limit=2&before={page['next_before']}", headers=ADMIN)
    ).json()
    assert [d["event_id"] for d in rest["items"]] == [bad[0]]
    assert rest["next_before"] is None

    one = (await api.get(f"/v1/dead-letters/{page['items'][0]['id']}", headers=ADMIN)).json()
    assert one["status"] == "open"
    assert one["timestamp"] == "-infinity"
    assert one["event"] == "Started"
    assert "timestamp" in one["error"]
    missing = await api.get("/v1/dead-letters/999999", headers=ADMIN)
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")

    # The operator fixes the event, then replays it: it is routed like any other.
    await eng.pool.execute("UPDATE events SET timestamp = now() WHERE id = $1", one["event_id"])
    r = await api.post(f"/v1/dead-letters/{one['id']}/replay", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "replayed"
    again = await api.post(f"/v1/dead-letters/{one['id']}/replay", headers=ADMIN)
    assert (again.status_code, again.json()["code"]) == (409, "invalid_state")
    while await eng.router.route_once():
        pass
    user = f"dl-{bad.index(one['event_id'])}"

    async def greeted() -> bool:
        cid = await eng.pool.fetchval(
            "SELECT customer_id FROM identities WHERE kind = 'user' AND value = $1", user
        )
        return bool(
            await eng.pool.fetchval(
                "SELECT count(*) FROM messages WHERE customer_id = $1 AND body = 'hi'", cid
            )
        )

    await eventually(greeted, what="the replayed event's customer greeted")
    open_ = (await api.get("/v1/dead-letters?status=open", headers=ADMIN)).json()
    assert sorted(d["event_id"] for d in open_["items"]) == [bad[0], bad[1]]


async def test_a_replayed_identify_never_rolls_back_a_newer_one(desk, monkeypatch):
    eng, api = desk
    real = profiles_module.valid_timezone

    def broken(name: object) -> bool:
        if name == "Broken/Zone":
            raise ValueError("timezone: cannot handle Broken/Zone")
        return real(name)

    monkeypatch.setattr(profiles_module, "valid_timezone", broken)
    a = identify("rp1", plan="free", company="acme", timezone="Broken/Zone")
    a["timestamp"] = "2026-01-01T00:00:00Z"
    await eng.send(a, identify("rp-other"))  # the other routes: A alone is the poison
    (letter,) = (await api.get("/v1/dead-letters", headers=ADMIN)).json()["items"]
    assert letter["message_id"] == a["messageId"]
    b = identify("rp1", plan="pro")
    b["timestamp"] = "2026-06-01T00:00:00Z"
    await eng.send(b)
    monkeypatch.undo()  # fixed; the operator replays A

    r = await api.post(f"/v1/dead-letters/{letter['id']}/replay", headers=ADMIN)
    assert r.status_code == 200, r.text
    while await eng.router.route_once():
        pass
    cid = await eng.customer("rp1")
    traits = await eng.pool.fetchval("SELECT traits FROM customers WHERE id = $1", cid)
    # B's newer plan stays; what A set that B did not is applied.
    assert traits == {"plan": "pro", "company": "acme", "timezone": "Broken/Zone"}
