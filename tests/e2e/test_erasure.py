"""Erasure of a customer (DELETE /v1/customers/{ref}): the real router, worker, API, PostgreSQL
and Temporal dev server. Nothing of the customer may be left in any table or in Temporal;
only a hashed suppression keeps an opted-out address opted out."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import ActivityEnvironment

from activities.channels import StoredChannel
from activities.channels.email import EmailChannel
from activities.contact_policy import ContactPolicy
from activities.erasure_activities import ORPHAN_WAIT, ErasureActivities
from activities.router import CHUNK_LOCK
from api.main import create_app
from core.settings import Settings
from models.privacy import ErasureInput, ErasureOutcome, FinishErasure, RunsEnded
from models.runtime import RunSummary
from models.segment import parse_event
from store import feedback
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
    # opted out of marketing: the new run's (marketing) email is skipped for want of consent.
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
        "email", "skipped", "no_consent"
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


# -- review fixes (2026-12): listing, merges, hashed opt-outs, the lock, orphans ------------
async def _erase_steps(eng: Engine, erasure_id: str) -> None:
    """The workflow's activities in its order, run here so a test can act between them."""
    steps = ErasureActivities(eng.pool, eng.client)
    inp = ErasureInput(erasure_id=erasure_id)
    run = ActivityEnvironment().run
    await run(steps.end_customer_runs, inp)
    await run(steps.erase_customer_data, inp)
    await run(steps.delete_customer_executions, inp)
    await run(steps.erase_customer_data, inp)
    await run(
        steps.finish_customer_erasure,
        FinishErasure(erasure_id=erasure_id, outcome=ErasureOutcome()),
    )


async def test_the_suppression_list_shows_what_erasures_keep(privacy_desk):
    eng, api = privacy_desk
    tag = uuid.uuid4().hex[:8]
    gone, kept = f"sl-gone-{tag}", f"sl-kept-{tag}"
    await eng.send(
        _identify(gone, email=f"{gone}@example.com"), _identify(kept, email=f"{kept}@example.com")
    )
    r = await api.put(
        f"/v1/customers/{gone}/subscriptions",
        json={"channel": "email", "topic": "marketing", "status": "unsubscribed"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    r = await api.delete(f"/v1/customers/{gone}", headers=ADMIN)
    assert r.status_code == 202, r.text
    await _completed(api, r.json()["id"])
    r = await api.post(
        "/v1/regulations",
        json={"regulationType": "SUPPRESS", "subjectType": "USER_ID", "subjectIds": [kept]},
        headers=ADMIN,
    )
    await _completed(api, r.json()["regulateId"])

    r = await api.get("/v1/suppressions", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert sorted((s["channel"], s["address"], s["reason"]) for s in r.json()) == sorted([
        ("email", hashed_address("email", f"{gone}@example.com"), "unsubscribed"),
        ("email", hashed_address("email", f"{kept}@example.com"), "regulation"),
    ])  # fmt: skip
    # Only the reasons a person gives can be added by hand.
    r = await api.post(
        "/v1/suppressions",
        json={"channel": "email", "address": f"x-{tag}@example.com", "reason": "regulation"},
        headers=ADMIN,
    )
    assert (r.status_code, r.json()["code"]) == (400, "invalid_request")


async def test_hashed_opt_outs_block_only_what_the_person_opted_out_of(privacy_desk):
    """A topic opt-out survives an erasure as a marketing-only block (transactional mail to a
    later profile with that address goes); real suppressions block everything, and both can
    be lifted: START lifts a hashed STOP, DELETE lifts plain and hashed rows."""
    eng, api = privacy_desk
    tag = uuid.uuid4().hex[:8]
    user, email = f"ho-{tag}", f"Ho.{tag}@Example.com"
    phone, other_phone = "+1 (555) 010-4242", "+15550104343"
    await eng.send(_identify(user, email=email, phone=phone), _identify(f"ho2-{tag}"))
    r = await api.put(
        f"/v1/customers/{user}/subscriptions",
        json={"channel": "email", "topic": "marketing", "status": "unsubscribed"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    cid = await eng.customer(user)
    async with eng.pool.acquire() as conn, conn.transaction():  # as an inbound STOP does
        await feedback.set_subscription(conn, cid, "sms", "*", "unsubscribed", "sms_keyword")
        await feedback.suppress(conn, "sms", phone, "stop")
    # A second profile with another number, manually suppressed, erased too.
    await eng.send(_identify(f"ho2-{tag}", phone=other_phone))
    r = await api.post(
        "/v1/suppressions", json={"channel": "sms", "address": other_phone, "reason": "manual"},
        headers=ADMIN,
    )  # fmt: skip
    assert r.status_code == 201, r.text
    for ref in (user, f"ho2-{tag}"):
        r = await api.delete(f"/v1/customers/{ref}", headers=ADMIN)
        await _completed(api, r.json()["id"])
    rows = await eng.pool.fetch("SELECT channel, address, reason FROM suppressions")
    assert sorted(tuple(r) for r in rows) == sorted([
        ("email", hashed_address("email", email), "unsubscribed"),
        ("sms", hashed_address("sms", phone), "stop"),
        ("sms", hashed_address("sms", other_phone), "manual"),
    ])  # fmt: skip

    policy = ContactPolicy([])

    async def refusal(
        channel: str, category: str, address: str, customer_id: str = "fresh"
    ) -> str | None:
        async with eng.pool.acquire() as conn:
            return await policy.refusal(
                conn, customer_id=customer_id, channel=channel, category=category,
                topic="marketing", address=address,
            )  # fmt: skip

    # The marketing opt-out: marketing is refused, a password reset goes.
    assert await refusal("email", "marketing", email.lower()) == "no_consent"
    assert await refusal("email", "transactional", email.lower()) is None
    assert await refusal("sms", "transactional", "+15550104242") == "suppressed"
    # A later profile at that address that opts in itself gets marketing again.
    await eng.send(_identify(f"ho3-{tag}", email=email))
    r = await api.put(
        f"/v1/customers/ho3-{tag}/subscriptions",
        json={"channel": "email", "topic": "marketing", "status": "subscribed"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    fresh = await eng.customer(f"ho3-{tag}")
    assert await refusal("email", "marketing", email.lower(), fresh) is None

    # START (store.feedback.unsuppress) lifts the hashed STOP.
    async with eng.pool.acquire() as conn:
        assert await feedback.unsuppress(conn, "sms", phone, "stop")
    assert await refusal("sms", "transactional", "+15550104242") is None
    # DELETE by the address, or by the hashed key the listing shows (also for SMS).
    hashed = hashed_address("sms", other_phone)
    r = await api.delete(f"/v1/suppressions/sms/{hashed}", headers=ADMIN)
    assert r.status_code == 204, r.text
    r = await api.delete(f"/v1/suppressions/email/{email.upper()}", headers=ADMIN)
    assert r.status_code == 204, r.text
    assert await eng.pool.fetch("SELECT * FROM suppressions") == []
    assert await refusal("email", "marketing", email.lower()) is None


async def test_the_delete_step_holds_routing_off_only_while_it_reads_and_deletes_rows(
    privacy_desk,
):
    """Temporal calls (listing and deleting the runs an event started meanwhile) happen
    without the router's chunk lock; the rows go once no live run is left."""
    eng, _ = privacy_desk
    tag = uuid.uuid4().hex[:8]
    user = f"lk-{tag}"
    await eng.send(_identify(user), track(user, "Signed Up"))
    await _at_step(eng, user, "long_wait")
    cid = await eng.customer(user)
    async with eng.pool.acquire() as conn, conn.transaction():
        row, _ = await start_erasure(conn, cid, requested_by="test", source="api", mode="erase")
    inp = ErasureInput(erasure_id=row["id"])
    held_during_temporal_calls: list[bool] = []
    pool = eng.pool

    class Probe(ErasureActivities):
        async def _lock_free(self) -> None:
            async with pool.acquire() as c:
                free = await c.fetchval("SELECT pg_try_advisory_lock($1)", CHUNK_LOCK)
                if free:
                    await c.execute("SELECT pg_advisory_unlock($1)", CHUNK_LOCK)
            held_during_temporal_calls.append(not free)

        async def _executions(self, *args: Any, **kw: Any) -> set[tuple[str, str]]:
            await self._lock_free()
            return await super()._executions(*args, **kw)

        async def _delete(self, workflow_id: str, run_id: str = "") -> bool:
            await self._lock_free()
            return await super()._delete(workflow_id, run_id)

    steps = Probe(eng.pool, eng.client)
    run = ActivityEnvironment().run
    await run(steps.end_customer_runs, inp)
    # A run started after the runs were ended: the delete step finds it.
    await eng.publish(LATE_JOURNEY)
    await eng.send(track(user, "Came Back"))
    await _at_step(eng, user, "hold", journey="privacy_late")
    held_during_temporal_calls.clear()
    await run(steps.erase_customer_data, inp)
    assert held_during_temporal_calls and not any(held_during_temporal_calls)
    assert await eng.pool.fetchval("SELECT count(*) FROM customers WHERE id = $1", cid) == 0
    with pytest.raises(RPCError) as err:
        await eng.client.get_workflow_handle(f"journey-privacy_late-{cid}").describe()
    assert err.value.status == RPCStatusCode.NOT_FOUND


async def test_merges_that_raced_the_request_are_erased_in_both_directions(privacy_desk):
    """The request's ids are fixed when it arrives; a merge routed before the request was
    visible to the router (here: the erasure row not yet committed) moved data. The delete
    step recomputes the ids: a loser merged into the erased customer (its consent and tasks
    stay under its own id) and a survivor the erased customer was merged into."""
    eng, api = privacy_desk
    tag = uuid.uuid4().hex[:8]
    # Loser into the erased customer: an anonymous visitor with a run, a task and consent.
    user, anon = f"mg-{tag}", f"mg-anon-{tag}"
    await eng.send(_identify(user, first_name=f"Mira{tag}"))
    await eng.send({"type": "track", "anonymousId": anon, "event": "Signed Up",
                    "messageId": f"m-{uuid.uuid4()}"})  # fmt: skip
    await _at_step(eng, anon, "long_wait")
    loser = await eng.customer(anon)
    r = await api.put(
        f"/v1/customers/{anon}/subscriptions",
        json={"channel": "sms", "topic": "alerts", "status": "subscribed"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    assert await eng.pool.fetchval("SELECT count(*) FROM tasks WHERE customer_id = $1", loser)
    erased = await eng.customer(user)
    # The erased customer into another: their anonymous id, then another user's identify.
    other_user, other_anon = f"mg-other-{tag}", f"mg-oanon-{tag}"
    await eng.send(_identify(f"mg-x-{tag}", other_anon, last_name=f"Xu{tag}"))
    x_cid = await eng.customer(f"mg-x-{tag}")
    await eng.send(_identify(other_user, last_name=f"Oz{tag}"))

    async with eng.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        first, _ = await start_erasure(
            conn, erased, requested_by="test", source="api", mode="erase"
        )
        second, _ = await start_erasure(
            conn, x_cid, requested_by="test", source="api", mode="erase"
        )
        # Routed while the requests are not visible yet: both merges happen.
        await eng.send(_identify(user, anon))  # the visitor merges into the erased customer
        await eng.send(_identify(other_user, other_anon))  # x merges into another profile
        await tx.commit()
    merged = {r["id"]: r["merged_into"] for r in await eng.pool.fetch(
        "SELECT id, merged_into FROM customers")}  # fmt: skip
    assert merged[loser] == erased
    assert merged[x_cid] == await eng.customer(other_user)

    await _erase_steps(eng, first["id"])
    await _erase_steps(eng, second["id"])
    needles = [erased, loser, user, anon, f"Mira{tag}", x_cid, other_anon, f"Xu{tag}"]
    assert await _rows_mentioning(eng.pool, needles) == {}
    assert await _visible(eng.client, f'CustomerId = "{loser}"') == []


async def test_no_merge_touches_a_customer_while_their_erasure_runs(privacy_desk):
    """An event that would merge a customer under erasure with another profile does not:
    it goes to the customer of its userId, the erased ids stay with the erased customer
    (and go with it), the other profile keeps only what was its own."""
    eng, _ = privacy_desk
    tag = uuid.uuid4().hex[:8]
    user, anon = f"nm-{tag}", f"nm-anon-{tag}"
    await eng.send(_identify(user, anon, first_name=f"Nina{tag}"))
    erased = await eng.customer(user)
    keeper = f"nm-keep-{tag}"
    await eng.send(_identify(keeper, last_name="Keep"))
    kept = await eng.customer(keeper)
    async with eng.pool.acquire() as conn, conn.transaction():
        row, _ = await start_erasure(conn, erased, requested_by="test", source="api", mode="erase")
    await eng.send(_identify(keeper, anon, city="Oslo"))  # would merge the erased into kept
    await eng.send(_identify(user, f"nm-other-{tag}"))  # a fresh visitor id: joins erased
    merged = {r["id"]: r["merged_into"] for r in await eng.pool.fetch(
        "SELECT id, merged_into FROM customers")}  # fmt: skip
    assert merged == {erased: None, kept: None}
    traits = await eng.pool.fetchval("SELECT traits FROM customers WHERE id = $1", kept)
    assert traits == {"last_name": "Keep", "city": "Oslo"}

    await _erase_steps(eng, row["id"])
    assert await _rows_mentioning(eng.pool, [erased, f"Nina{tag}", f"nm-other-{tag}"]) == {}
    assert await eng.customer(keeper) == kept
    # The erased visitor id is free again: its next event makes a fresh profile.
    await eng.send({"type": "page", "anonymousId": anon, "messageId": f"m-{uuid.uuid4()}"})
    assert await eng.customer(anon) not in (erased, kept)


async def test_an_erasure_whose_workflow_cannot_start_is_not_recorded(privacy_desk, pg_url):
    """The workflow is started before the erasure row commits: if Temporal refuses the start,
    the API answers 503 and nothing is left running that no workflow carries out."""
    eng, api = privacy_desk
    tag = uuid.uuid4().hex[:8]
    user = f"or-{tag}"
    await eng.send(_identify(user))
    broken = Settings(
        database_url=pg_url,
        temporal_address=eng.client.service_client.config.target_host,
        temporal_namespace=f"missing-{tag}",  # every start is refused: namespace not found
        journeys_admin_key="admin",
        temporal_task_queue=eng.task_queue,
    )
    app = create_app(broken)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as down:
            r = await down.delete(f"/v1/customers/{user}", headers=ADMIN)
    assert (r.status_code, r.json()["code"]) == (503, "unavailable"), r.text
    assert await eng.pool.fetchval("SELECT count(*) FROM erasures") == 0
    r = await api.delete(f"/v1/customers/{user}", headers=ADMIN)
    assert r.status_code == 202, r.text
    await _completed(api, r.json()["id"])


async def test_the_first_step_waits_for_the_row_then_gives_up(privacy_desk):
    """A workflow started for a row that is not committed yet retries; one whose row never
    came (the API's commit failed after the start) ends after ORPHAN_WAIT doing nothing."""
    eng, _ = privacy_desk
    steps = ErasureActivities(eng.pool, eng.client)
    inp = ErasureInput(erasure_id=uuid.uuid4().hex)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, scheduled_time=datetime.now(UTC))
    with pytest.raises(ApplicationError) as err:
        await env.run(steps.end_customer_runs, inp)
    assert err.value.type == "ErasureNotRecorded" and not err.value.non_retryable
    long_ago = datetime.now(UTC) - ORPHAN_WAIT - timedelta(seconds=1)
    env.info = dataclasses.replace(env.info, scheduled_time=long_ago)
    assert await env.run(steps.end_customer_runs, inp) == RunsEnded()
