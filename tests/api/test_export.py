"""GET /v1/customers/{ref}/export: everything held about a customer, as JSON (in-process API,
real router and worker on the Temporal dev server)."""

from __future__ import annotations

import uuid
from typing import Any

from models.runtime import RunSummary
from tests.conftest import eventually
from tests.harness import ADMIN, Engine, track
from workflows.journey import JourneyWorkflow

JOURNEY = {
    "id": "export_me",
    "name": "Export me",
    "entry": {"event": "Signed Up"},
    "steps": [
        {"id": "hello", "kind": "send", "channel": "outbox", "template": {"body": "Hello"}},
        {"id": "note", "kind": "send", "channel": "in_app",
         "template": {"subject": "News", "body": "In the app"}},
        {"id": "ticket", "kind": "handoff", "queue": "support", "title": "Call them"},
        {"id": "long_wait", "kind": "wait", "duration": "30d"},
    ],
}  # fmt: skip


def _msg(**fields: Any) -> dict[str, Any]:
    return {**fields, "messageId": f"m-{uuid.uuid4()}"}


async def _at_long_wait(eng: Engine, ref: str) -> RunSummary:
    handle = await eng.run("export_me", ref)

    async def there() -> RunSummary | None:
        summary = await handle.query(JourneyWorkflow.summary)
        return summary if summary.step_id == "long_wait" else None

    return await eventually(there, within=30, what="the run at long_wait")


async def test_export_holds_every_kind_of_data(desk):
    eng, api = desk
    await eng.publish(JOURNEY)
    tag = uuid.uuid4().hex[:8]
    user, anon, email = f"xp-{tag}", f"xp-anon-{tag}", f"XP.{tag}@Example.com"
    sent = [
        _msg(type="page", anonymousId=anon, name="Home"),  # a customer of its own at first
        _msg(type="identify", userId=user, traits={"email": email, "plan": "pro"}),
        _msg(type="identify", userId=user, anonymousId=anon, traits={"phone": "+15550001111"}),
        track(user, "Signed Up", source="ads"),
    ]
    for event in sent:  # one at a time: the page's customer exists before the merge
        await eng.send(event)
    await _at_long_wait(eng, user)
    cid = await eng.customer(user)
    r = await api.put(
        f"/v1/customers/{user}/subscriptions",
        json={"channel": "email", "topic": "marketing", "status": "unsubscribed"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    r = await api.post(
        "/v1/suppressions", json={"channel": "email", "address": email}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    while await eng.router.route_once():
        pass

    r = await api.get(f"/v1/customers/{email}/export", headers=ADMIN)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {
        "exported_at", "customer", "merged_ids", "identities", "events", "messages", "inbox",
        "runs", "tasks", "consent", "suppressions",
    }  # fmt: skip
    assert out["customer"]["id"] == cid
    assert out["customer"]["traits"] == {
        "email": email,
        "plan": "pro",
        "phone": "+15550001111",
    }
    assert len(out["merged_ids"]) == 1 and out["merged_ids"][0] != cid
    assert {(i["kind"], i["value"]) for i in out["identities"]} == {
        ("user", user),
        ("anonymous", anon),
        ("email", email.lower()),
        ("phone", "+15550001111"),
    }
    by_id = {e["message_id"]: e for e in out["events"]}
    assert {e["messageId"] for e in sent} <= set(by_id)
    assert by_id[sent[3]["messageId"]]["payload"]["properties"] == {"source": "ads"}
    assert by_id[sent[0]["messageId"]]["payload"]["name"] == "Home"
    assert any(e["event"] == "Unsubscribed" for e in out["events"])
    assert [(m["channel"], m["body"], m["status"]) for m in out["messages"]] == [
        ("outbox", "Hello", "sent"),
        ("in_app", "In the app", "sent"),
    ]
    assert [(m["subject"], m["body"]) for m in out["inbox"]] == [("News", "In the app")]
    (run,) = out["runs"]
    assert (run["journey_id"], run["status"], run["current_step"]) == (
        "export_me", "running", "long_wait"
    )  # fmt: skip
    assert [h["step_id"] for h in run["history"]] == ["hello", "note", "ticket", "long_wait"]
    (task,) = out["tasks"]
    assert (task["queue"], task["title"], task["status"]) == ("support", "Call them", "open")
    assert [(c["channel"], c["topic"], c["status"]) for c in out["consent"]] == [
        ("email", "marketing", "unsubscribed")
    ]
    assert [(s["channel"], s["address"], s["reason"]) for s in out["suppressions"]] == [
        ("email", email.lower(), "manual")
    ]

    missing = await api.get(f"/v1/customers/nobody-{tag}/export", headers=ADMIN)
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    assert (await api.get(f"/v1/customers/{user}/export")).status_code == 401


async def test_export_shows_what_an_erased_customer_left_on_their_address(desk):
    """Someone erased earlier opted out of marketing at this address; this customer also
    suppressed it by hand. The export lists both rows that block the address: the plain one
    and the hashed one kept by the erasure (shown with the address, not its hash)."""
    eng, api = desk
    tag = uuid.uuid4().hex[:8]
    email = f"Shared.{tag}@Example.com"
    before, now = f"xp-before-{tag}", f"xp-now-{tag}"
    await eng.send(_msg(type="identify", userId=before, traits={"email": email}))
    r = await api.put(
        f"/v1/customers/{before}/subscriptions",
        json={"channel": "email", "topic": "marketing", "status": "unsubscribed"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    erasure = (await api.delete(f"/v1/customers/{before}", headers=ADMIN)).json()

    async def completed() -> bool:
        r = await api.get(f"/v1/erasures/{erasure['id']}", headers=ADMIN)
        return r.json()["status"] == "completed"

    await eventually(completed, within=90, what="the erasure")
    await eng.send(_msg(type="identify", userId=now, traits={"email": email}))
    r = await api.post(
        "/v1/suppressions", json={"channel": "email", "address": email}, headers=ADMIN
    )
    assert r.status_code == 201, r.text

    r = await api.get(f"/v1/customers/{now}/export", headers=ADMIN)
    assert r.status_code == 200, r.text
    rows = r.json()["suppressions"]
    assert sorted((s["channel"], s["address"], s["reason"], s["hashed"]) for s in rows) == [
        ("email", email.lower(), "manual", False),
        ("email", email.lower(), "unsubscribed", True),
    ]
    assert "merged_ids" in r.json() and before not in r.text
