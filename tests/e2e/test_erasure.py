"""Erasure of a customer (DELETE /v1/customers/{ref}): the real router, worker, API, PostgreSQL
and Temporal dev server. Nothing of the customer may be left in any table or in Temporal;
only a hashed suppression keeps an opted-out address opted out."""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import ActivityEnvironment

from activities.channels import StoredChannel
from activities.channels.email import EmailChannel
from activities.contact_policy import ContactPolicy
from activities.erasure_activities import ErasureActivities
from models.privacy import ErasureInput, ErasureOutcome, FinishErasure
from models.runtime import RunSummary
from models.segment import parse_event
from store.erasure import hashed_address, start_erasure
from store.events import store_events
from tests.conftest import eventually
from tests.e2e.conftest import WRITE_KEY as STACK_WRITE_KEY
from tests.e2e.conftest import Stack
from tests.e2e.conftest import admin as stack_admin
from tests.harness import ADMIN, Engine, admin_api, engine, track
from workflows.erase import erasure_workflow_id
from workflows.journey import JourneyWorkflow

JOURNEY = {
    "id": "privacy_welcome",
    "name": "Privacy welcome",
    "entry": {"event": "Signed Up"},
    "re_entry": {"policy": "always"},
    "steps": [
        {"id": "hello", "kind": "send", "channel": "email",
         "template": {"subject": "Welcome", "body": "Welcome!"}},
        {"id": "note", "kind": "send", "channel": "in_app", "template": {"body": "In the app"}},
        {"id": "ticket", "kind": "handoff", "queue": "support", "title": "Call the customer"},
        {"id": "long_wait", "kind": "wait", "duration": "30d"},
        {"id": "bye", "kind": "send", "channel": "email", "template": {"body": "Bye"}},
    ],
}  # fmt: skip


# Completes at once: its closed execution must go from Temporal too.
DONE_JOURNEY = {
    "id": "privacy_done",
    "name": "Thanks",
    "entry": {"event": "Signed Up"},
    "steps": [
        {"id": "thanks", "kind": "send", "channel": "outbox", "template": {"body": "Thanks"}}
    ],
}

LATE_JOURNEY = {
    "id": "privacy_late",
    "name": "Came back",
    "entry": {"event": "Came Back"},
    "steps": [{"id": "hold", "kind": "wait", "duration": "30d"}],
}


@pytest.fixture
async def privacy_desk(
    db, pg_url, dev_env, smtp
) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    _, port = smtp
    mail = EmailChannel(host="127.0.0.1", port=port, sender="Shop <news@shop.example>",
                        sender_domain="shop.example", timeout=5)  # fmt: skip
    channels = {"outbox": StoredChannel("outbox"), "in_app": StoredChannel("in_app"), "email": mail}
    async with engine(db, dev_env, channels=channels) as eng, admin_api(eng, pg_url) as api:
        await eng.publish(JOURNEY)
        yield eng, api


def _identify(user: str, anon: str | None = None, **traits: Any) -> dict[str, Any]:
    event = {"type": "identify", "userId": user, "traits": traits,
             "messageId": f"m-{uuid.uuid4()}"}  # fmt: skip
    if anon:
        event["anonymousId"] = anon
    return event


async def _route(eng: Engine) -> None:
    while await eng.router.route_once():
        pass


async def _at_step(
    eng: Engine, ref: str, step: str, journey: str = "privacy_welcome"
) -> RunSummary:
    handle = await eng.run(journey, ref)

    async def there() -> RunSummary | None:
        try:
            summary = await handle.query(JourneyWorkflow.summary)
        except RPCError:
            return None
        return summary if summary.step_id == step else None

    return await eventually(there, within=30, what=f"{ref} at {step}")


async def _completed(
    api: httpx.AsyncClient, erasure_id: str, headers: dict[str, str] = ADMIN
) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        body = (await api.get(f"/v1/erasures/{erasure_id}", headers=headers)).json()
        return body if body["status"] == "completed" else None

    return await eventually(done, within=90, what=f"erasure {erasure_id} completed")


async def _rows_mentioning(pool: asyncpg.Pool, needles: list[str]) -> dict[str, int]:
    """Rows of every table whose text form contains any of the needles (case-insensitive)."""
    tables = [
        r["table_name"]
        for r in await pool.fetch(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )
    ]
    assert {"customers", "events", "messages", "suppressions", "erasures"} <= set(tables)
    found: dict[str, int] = {}
    patterns = [f"%{n}%" for n in needles]
    for table in tables:
        n = await pool.fetchval(
            f'SELECT count(*) FROM "{table}" AS t WHERE t::text ILIKE ANY($1::text[])', patterns
        )
        if n:
            found[table] = n
    return found


async def _visible(client: Client, query: str) -> list[str]:
    return [f"{wf.id}/{wf.run_id}" async for wf in client.list_workflows(query)]


async def test_erasure_leaves_nothing_but_a_hashed_suppression(privacy_desk):
    eng, api = privacy_desk
    await eng.publish(DONE_JOURNEY)
    tag = uuid.uuid4().hex[:8]
    user, anon = f"eve-{tag}", f"anon-{tag}"
    email, phone = f"Eve.{tag}@Example.com", "+1 (555) 010-7788"
    await eng.send(
        _identify(user, anon, email=email, phone=phone, first_name=f"Evelyn{tag}"),
        track(user, "Signed Up", plan="pro"),
        {"type": "page", "anonymousId": anon, "name": "Pricing", "messageId": f"m-{uuid.uuid4()}"},
    )
    await _at_step(eng, user, "long_wait")
    cid = await eng.customer(user)
    done_run = await eng.run("privacy_done", user)
    assert (await done_run.result()).status == "completed"
    sent, note = [m for m in await eng.messages(user) if m["channel"] != "outbox"]
    assert (sent["channel"], sent["status"], sent["address"]) == ("email", "sent", email.lower())
    assert note["channel"] == "in_app"
    assert await eng.pool.fetchval("SELECT count(*) FROM tasks WHERE customer_id = $1", cid) == 1
    r = await api.put(
        f"/v1/customers/{user}/subscriptions",
        json={"channel": "email", "topic": "marketing", "status": "unsubscribed"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    r = await api.post(
        "/v1/suppressions", json={"channel": "sms", "address": phone, "reason": "manual"},
        headers=ADMIN,
    )  # fmt: skip
    assert r.status_code == 201, r.text
    await _route(eng)  # the Unsubscribed event reaches the profile and the run
    workflow_ids = [
        r["workflow_id"]
        for r in await eng.pool.fetch(
            "SELECT workflow_id FROM journey_runs WHERE customer_id = $1", cid
        )
    ]
    assert len(workflow_ids) == 2
    assert await _visible(eng.client, f'CustomerId = "{cid}"')

    r = await api.delete(f"/v1/customers/{user}", headers=ADMIN)
    assert r.status_code == 202, r.text
    erasure = r.json()
    assert erasure["status"] in ("running", "completed")
    again = await api.delete(f"/v1/customers/{email}", headers=ADMIN)
    assert (again.status_code, again.json()["id"]) == (202, erasure["id"])

    done = await _completed(api, erasure["id"])
    assert done["requested_by"] and done["requested_at"] and done["completed_at"]
    assert done["customer_hash"] == hashlib.sha256(cid.encode()).hexdigest()
    assert done["counts"]["runs"]["found"] >= 1
    assert done["counts"]["data"]["counts"]["events"] >= 4
    assert done["counts"]["data"]["suppressed"] == 2  # email (unsubscribed), sms (manual)

    # Nothing of them in any table: ids, email (any case), phone, a trait value.
    needles = [cid, user, anon, email.lower(), "555) 010-7788", "+15550107788", f"Evelyn{tag}"]
    assert await _rows_mentioning(eng.pool, needles) == {}
    # Nor in Temporal: visibility by search attribute and by workflow id, and describe.
    assert await _visible(eng.client, f'CustomerId = "{cid}"') == []
    for wid in workflow_ids:
        assert await _visible(eng.client, f'WorkflowId = "{wid}"') == []
        with pytest.raises(RPCError) as err:
            await eng.client.get_workflow_handle(wid).describe()
        assert err.value.status == RPCStatusCode.NOT_FOUND
    # The erasure's own history names no one.
    erasure_run = eng.client.get_workflow_handle(erasure_workflow_id(erasure["id"]))
    assert not [n for n in needles if n.lower() in await _history_text(erasure_run)]

    # Repeats answer the same erasure; a ref never seen is 404.
    for ref in (user, anon, email, cid):
        r = await api.delete(f"/v1/customers/{ref}", headers=ADMIN)
        assert (r.status_code, r.json()["id"], r.json()["status"]) == (
            202, erasure["id"], "completed"
        )  # fmt: skip
    r = await api.delete(f"/v1/customers/nobody-{tag}", headers=ADMIN)
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    assert (await api.get(f"/v1/customers/{user}", headers=ADMIN)).status_code == 404

    # Suppressions stay, hashed: the opted-out email and the suppressed phone.
    keys = {(r["channel"], r["address"], r["reason"]) for r in await eng.pool.fetch(
        "SELECT channel, address, reason FROM suppressions")}  # fmt: skip
    assert keys == {
        ("email", hashed_address("email", email), "unsubscribed"),
        ("sms", hashed_address("sms", phone), "manual"),
    }
    async with eng.pool.acquire() as conn:
        refusal = await ContactPolicy([]).refusal(
            conn, customer_id="x", channel="sms", category="transactional", topic="t",
            address="+15550107788",
        )  # fmt: skip
    assert refusal == "suppressed"

    # A later event for the same userId makes a fresh profile, and the old address stays
    # opted out: the new run's email is skipped as suppressed.
    old_events = {r["message_id"] for r in await eng.pool.fetch("SELECT message_id FROM events")}
    later = [_identify(user, email=email), track(user, "Signed Up")]
    await eng.send(*later)
    fresh = await eng.customer(user)
    assert fresh != cid
    profile = (await api.get(f"/v1/customers/{user}", headers=ADMIN)).json()
    assert profile["traits"] == {"email": email}
    events = (await api.get(f"/v1/customers/{user}/events", headers=ADMIN)).json()["items"]
    assert {e["message_id"] for e in events} == {e["messageId"] for e in later}
    assert not old_events & {e["message_id"] for e in events}

    async def skipped() -> asyncpg.Record | None:
        rows = [m for m in await eng.messages(user) if m["channel"] == "email"]
        return rows[0] if rows else None

    first = await eventually(skipped, within=30, what="the fresh profile's first send")
    assert (first["channel"], first["status"], first["skip_reason"]) == (
        "email", "skipped", "suppressed"
    )  # fmt: skip


async def test_events_during_the_erasure_do_not_resurrect_the_profile(privacy_desk):
    """The worst moments, step by step: an event routed after the runs were ended (it starts
    a new run and adds a trait to the old profile), and one stored but not routed when the
    rows are deleted (it came after the request: it makes a fresh profile)."""
    eng, _ = privacy_desk
    tag = uuid.uuid4().hex[:8]
    user = f"ray-{tag}"
    await eng.send(_identify(user, first_name=f"Ray{tag}"), track(user, "Signed Up"))
    await _at_step(eng, user, "long_wait")
    cid = await eng.customer(user)
    async with eng.pool.acquire() as conn, conn.transaction():
        row, created = await start_erasure(
            conn, cid, requested_by="test", source="api", mode="erase"
        )
    assert created
    steps = ErasureActivities(eng.pool, eng.client)
    inp = ErasureInput(erasure_id=row["id"])
    run = ActivityEnvironment().run
    ended = await run(steps.end_customer_runs, inp)
    assert ended.found == 1

    # Routed between ending the runs and deleting: back to the old profile, and a run of
    # another journey starts for them.
    await eng.publish(LATE_JOURNEY)
    await eng.send(_identify(user, secret=f"old-{tag}"), track(user, "Came Back"))
    await _at_step(eng, user, "hold", journey="privacy_late")
    traits = await eng.pool.fetchval("SELECT traits FROM customers WHERE id = $1", cid)
    assert traits["secret"] == f"old-{tag}"
    # Stored, not routed yet, when the rows go.
    await store_events(eng.pool, [parse_event(_identify(user, note=f"new-{tag}")).model_dump()])

    await run(steps.erase_customer_data, inp)
    await run(steps.delete_customer_executions, inp)  # the runs went with steps 1 and 2
    await run(steps.erase_customer_data, inp)
    await run(
        steps.finish_customer_erasure,
        FinishErasure(erasure_id=inp.erasure_id, outcome=ErasureOutcome()),
    )
    assert await _rows_mentioning(eng.pool, [cid, f"Ray{tag}", f"old-{tag}"]) == {}
    assert await _visible(eng.client, f'CustomerId = "{cid}"') == []
    for journey in ("privacy_welcome", "privacy_late"):
        assert await _visible(eng.client, f'WorkflowId = "journey-{journey}-{cid}"') == []

    await _route(eng)
    fresh = await eng.customer(user)
    assert fresh != cid
    traits = await eng.pool.fetchval("SELECT traits FROM customers WHERE id = $1", fresh)
    assert traits == {"note": f"new-{tag}"}


async def test_segment_regulations_map_onto_erasures(privacy_desk):
    eng, api = privacy_desk
    tag = uuid.uuid4().hex[:8]
    kept, gone = f"kept-{tag}", f"gone-{tag}"
    await eng.send(
        _identify(kept, email=f"kept.{tag}@example.com"),
        _identify(gone, email=f"gone.{tag}@example.com"),
    )
    r = await api.post(
        "/v1/regulations",
        json={"regulationType": "SUPPRESS", "subjectType": "userId", "subjectIds": [kept]},
        headers=ADMIN,
    )
    assert r.status_code == 202, r.text
    assert r.json()["regulateId"] == r.json()["erasures"][0]["id"]
    done = await _completed(api, r.json()["regulateId"])
    assert done["mode"] == "suppress"
    # SUPPRESS keeps the customer and blocks their addresses.
    assert (await api.get(f"/v1/customers/{kept}", headers=ADMIN)).status_code == 200
    r = await api.post(
        "/v1/regulations",
        json={
            "regulationType": "SUPPRESS_WITH_DELETE",
            "subjectType": "USER_ID",
            "subjectIds": [gone, f"never-{tag}"],
        },
        headers=ADMIN,
    )
    assert r.status_code == 202, r.text
    assert r.json()["unknownSubjects"] == [f"never-{tag}"]
    await _completed(api, r.json()["regulateId"])
    assert (await api.get(f"/v1/customers/{gone}", headers=ADMIN)).status_code == 404
    assert await _rows_mentioning(eng.pool, [gone]) == {}
    rows = await eng.pool.fetch("SELECT channel, address, reason FROM suppressions")
    assert {(r["channel"], r["address"], r["reason"]) for r in rows} == {
        ("email", hashed_address("email", f"kept.{tag}@example.com"), "regulation"),
        ("email", hashed_address("email", f"gone.{tag}@example.com"), "regulation"),
    }
    bad = await api.post(
        "/v1/regulations",
        json={"regulationType": "FORGET", "subjectType": "userId", "subjectIds": [kept]},
        headers=ADMIN,
    )
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_request")
    assert "regulationType" in bad.json()["message"]


async def _history_text(handle: Any) -> str:
    """A workflow's history with its payloads decoded (they are base64 in the JSON form)."""
    raw = (await handle.fetch_history()).to_json()
    decoded = [
        base64.b64decode(m).decode(errors="replace")
        for m in re.findall(r'"data":\s*"([A-Za-z0-9+/=]+)"', raw)
    ]
    return (raw + "\n".join(decoded)).lower()


async def test_an_erasure_requested_while_the_worker_is_down_completes_when_it_returns(
    stack: Stack, db
):
    """Real processes: the API accepts the erasure (a workflow) with no worker running,
    repeats answer the same running erasure, and a worker started later carries it out."""
    stack.start_api()
    stack.start_worker()
    tag = uuid.uuid4().hex[:8]
    user = f"down-{tag}"
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack_admin()) as api:
        assert (await api.post("/v1/journeys", json=LATE_JOURNEY)).status_code == 200
        events = {"batch": [_identify(user, email=f"{user}@example.com"), track(user, "Came Back")]}
        r = await api.post("/v1/batch", json=events, auth=(STACK_WRITE_KEY, ""))
        assert r.status_code == 200, r.text

        async def running() -> bool:
            return bool(
                await db.fetchval("SELECT count(*) FROM journey_runs WHERE status = 'running'")
            )

        await eventually(running, within=30, what="the run started")
        cid = await db.fetchval("SELECT customer_id FROM identities WHERE value = $1", user)
        stack.kill("worker")

        r = await api.delete(f"/v1/customers/{user}", headers=stack_admin())
        assert (r.status_code, r.json()["status"]) == (202, "running"), r.text
        erasure_id = r.json()["id"]
        again = await api.delete(f"/v1/customers/{user}", headers=stack_admin())
        assert (again.status_code, again.json()["id"]) == (202, erasure_id)
        status = (await api.get(f"/v1/erasures/{erasure_id}", headers=stack_admin())).json()
        assert status["status"] == "running"

        stack.start_worker()
        done = await _completed(api, erasure_id, headers=stack_admin())
        assert done["counts"]["runs"]["found"] == 1
        assert await _rows_mentioning(db, [cid, user]) == {}
