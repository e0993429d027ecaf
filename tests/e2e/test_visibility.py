"""What marketers and operators see, against the dev server (real visibility, real API):
failed sends in every aggregate, entries refused by a pause, held runs, stale live views, and
runs found in Temporal's own tools by the customer's userId / anonymousId / email."""

from __future__ import annotations

import uuid
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.common import WorkflowIDReusePolicy

from models.runtime import JourneyRunInput, LaunchInput
from store.journeys import parse_definition
from tests.conftest import eventually
from tests.harness import ADMIN, identify, track
from workflows.journey import JourneyWorkflow, workflow_id_for
from workflows.launch import LaunchWorkflow


def _journey(jid: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": jid, "name": jid, "entry": {"event": "Started"}, "steps": steps}


# The first send fails at render time for a customer whose `n` is not a number.
FAILING = _journey(
    "failing",
    [
        {"id": "oops", "kind": "send", "template": {"body": "{{ profile.n + 1 }}"}},
        {"id": "fine", "kind": "send", "template": {"body": "hello"}},
    ],
)
WAITING = _journey("waiting", [{"id": "nap", "kind": "wait", "duration": "1h"}])


async def _listed(client: Any, query: str) -> list[str]:
    return [w.id async for w in client.list_workflows(query)]


async def _signals(handle: Any, name: str) -> int:
    names = [
        e.workflow_execution_signaled_event_attributes.signal_name
        async for e in handle.fetch_history_events()
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    ]
    return names.count(name)


async def test_a_failed_send_shows_in_the_run_the_channel_report_and_the_status(desk):
    eng, api = desk
    await eng.publish(FAILING)
    await eng.send(identify("ann", email="ann@example.com", n="x"), track("ann", "Started"))
    handle = await eng.run("failing", "ann")
    result = await eng.result(handle)
    assert (result.status, result.failures) == ("completed_with_failures", 1)

    report = (await api.get("/v1/journeys/failing/channels", headers=ADMIN)).json()
    oops = next(s for s in report["steps"] if s["step_id"] == "oops")
    assert (oops["failed"], oops["failures"]) == (1, {"template_error": 1})

    runs = (await api.get("/v1/customers/ann/journeys", headers=ADMIN)).json()
    assert [(r["status"], r["failures"], r["stale"]) for r in runs] == [
        ("completed_with_failures", 1, False)
    ]
    assert runs[0]["failed"][0]["step_id"] == "oops"
    journey = (await api.get("/v1/journeys/failing", headers=ADMIN)).json()
    assert journey["runs"] == {"completed_with_failures": 1}

    # Operators: by the customer's email or userId, and by status.
    wid = handle.id
    for query in (
        'CustomerRefs="ann@example.com"',
        'CustomerRefs="ann"',
        'JourneyStatus="completed_with_failures" AND JourneyId="failing"',
    ):

        async def found(q: str = query) -> bool:
            return await _listed(eng.client, q) == [wid]

        await eventually(found, what=query)


async def test_customer_refs_follow_identify_and_merge_but_not_every_event(desk):
    eng, _ = desk
    await eng.publish(WAITING)
    await eng.send(identify("bob", email="bob@example.com"))
    visitor = {"type": "track", "anonymousId": "anon-7", "event": "Started",
               "messageId": f"m-{uuid.uuid4()}"}  # fmt: skip
    await eng.send(visitor)
    anon = await eng.customer("anon-7")
    handle = eng.client.get_workflow_handle(workflow_id_for("waiting", anon))
    assert (await handle.query(JourneyWorkflow.summary)).customer_refs == ["anon-7"]

    # An event that adds no identity does not signal the run.
    await eng.send({**visitor, "event": "Browsed", "messageId": f"m-{uuid.uuid4()}"})
    assert await _signals(handle, "refs") == 0

    # The visitor logs in as bob: merged into bob, the run follows and is found by bob's ids.
    await eng.send({**identify("bob"), "anonymousId": "anon-7"})
    summary = await handle.query(JourneyWorkflow.summary)
    assert summary.customer_id == await eng.customer("bob") != anon
    assert set(summary.customer_refs) == {"bob", "bob@example.com", "anon-7"}
    assert summary.customer_refs[0] == "bob"  # userIds first

    for ref in ("bob", "bob@example.com", "anon-7"):

        async def found(r: str = ref) -> bool:
            return await _listed(eng.client, f'CustomerRefs="{r}"') == [handle.id]

        await eventually(found, what=f"CustomerRefs={ref}")
    # Identifying again with what is already known changes nothing: no signal.
    await eng.send(
        identify("bob", email="BOB@example.com"), {**identify("bob"), "anonymousId": "anon-7"}
    )
    assert await _signals(handle, "refs") == 1
    # A new email is a change.
    await eng.send(identify("bob", email="robert@example.com"))
    assert await _signals(handle, "refs") == 2
    assert "robert@example.com" in (await handle.query(JourneyWorkflow.summary)).customer_refs


async def test_held_runs_say_held_in_rest_and_in_journey_status(desk):
    eng, api = desk
    await eng.publish(WAITING)
    await eng.send(track("hal", "Started"))
    handle = await eng.run("waiting", "hal")
    r = await api.post("/v1/journeys/waiting/pause", headers=ADMIN)
    assert r.status_code == 200, r.text

    async def held() -> bool:
        runs = (await api.get("/v1/customers/hal/journeys", headers=ADMIN)).json()
        return [x["status"] for x in runs] == ["held"]

    await eventually(held, what="the run shows held")
    journey = (await api.get("/v1/journeys/waiting", headers=ADMIN)).json()
    assert journey["runs"] == {"held": 1}

    async def listed_held() -> bool:
        return await _listed(eng.client, 'JourneyStatus="held"') == [handle.id]

    await eventually(listed_held, what="JourneyStatus=held")
    assert await _signals(handle, "pause_run") == 1

    await api.post("/v1/journeys/waiting/resume", headers=ADMIN)
    assert await _signals(handle, "resume_run") == 1
    assert (await handle.query(JourneyWorkflow.summary)).status == "running"


async def test_entries_while_paused_are_recorded_and_enrolling_is_409(desk):
    eng, api = desk
    await eng.publish(WAITING)
    await api.post("/v1/journeys/waiting/pause", headers=ADMIN)
    await eng.send(identify("pia"))
    entry = track("pia", "Started")
    await eng.send(entry, track("pia", "Unrelated"))
    # Routed again (a dead letter replayed): still counted once.
    await eng.pool.execute("UPDATE events SET routed_at = NULL")
    await eng.send()

    journey = (await api.get("/v1/journeys/waiting", headers=ADMIN)).json()
    assert journey["not_entered"] == {"paused": 1}
    events = (await api.get("/v1/customers/pia/events", headers=ADMIN)).json()["items"]
    marks = {e["message_id"]: e["not_entered"] for e in events}
    assert marks[entry["messageId"]] == {"waiting": "paused"}
    assert all(v == {} for k, v in marks.items() if k != entry["messageId"])

    r = await api.post(
        "/v1/journeys/waiting/enroll",
        json={"customer": "pia", "idempotency_key": "k1"},
        headers=ADMIN,
    )
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "journey_paused"
    assert "journey_id" in r.json()["message"] and "paused" in r.json()["message"]


async def test_the_live_view_says_when_it_shows_the_stored_row(desk):
    eng, api = desk
    await eng.send(identify("sam"))
    cid = await eng.customer("sam")
    defn = parse_definition(WAITING)
    # A run whose workflow nobody can answer for (its task queue has no worker) ...
    slow = f"journey-waiting-{cid}-slow"
    await eng.client.start_workflow(
        JourneyWorkflow.run,
        JourneyRunInput(journey=defn, customer_id=cid, enrollment_id=f"{slow}:e1"),
        id=slow,
        task_queue=f"nobody-{uuid.uuid4().hex[:6]}",
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )
    # ... and one whose history is gone.
    gone = f"journey-waiting-{cid}-gone"
    await eng.pool.executemany(
        "INSERT INTO journey_runs (enrollment_id, workflow_id, journey_id, journey_version, "
        "customer_id, status) VALUES ($1, $2, 'waiting', 1, $3, 'running')",
        [(f"{slow}:e1", slow, cid), (f"{gone}:e1", gone, cid)],
    )
    try:
        runs = (await api.get("/v1/customers/sam/journeys", headers=ADMIN)).json()
    finally:
        await eng.client.get_workflow_handle(slow).terminate("test ended")
    by_id = {r["workflow_id"]: r for r in runs}
    for wid in (slow, gone):
        assert by_id[wid]["stale"] is True
        assert (by_id[wid]["current_step"], by_id[wid]["history"]) == (None, [])
    assert "did not answer" in by_id[slow]["stale_reason"]
    assert "no longer kept" in by_id[gone]["stale_reason"]


async def test_a_launch_shows_failed_sends_and_a_failed_page(desk):
    eng, api = desk
    await eng.publish(FAILING)
    await eng.send(*(identify(f"l{i}", n="x") for i in range(3)))
    r = await api.post("/v1/journeys/failing/launches", json={}, headers=ADMIN)
    assert r.status_code == 201, r.text
    launch_id = r.json()["id"]

    async def done() -> dict[str, Any] | None:
        got = (await api.get(f"/v1/launches/{launch_id}", headers=ADMIN)).json()
        return got if got["status"] == "completed" and got["failed_runs"] == 3 else None

    got = await eventually(done, what="the launch's runs ended")
    assert (got["enrolled"], got["failed_sends"], got["error"]) == (3, 3, None)

    # A page that fails for good (the journey is no longer active) fails the launch, recorded.
    await api.post("/v1/journeys/failing/archive", headers=ADMIN)
    handle = await eng.client.start_workflow(
        LaunchWorkflow.run,
        LaunchInput(journey_id="failing", launch_id="gone-page"),
        id="launch-gone-page",
        task_queue=eng.task_queue,
    )
    assert (await handle.result()).status == "failed"
    failed = (await api.get("/v1/launches/gone-page", headers=ADMIN)).json()
    assert failed["status"] == "failed"
    assert "not active" in failed["error"]
