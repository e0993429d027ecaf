"""Failures, holds and identities a run shows (time-skipping server, real Postgres): a failed
send is counted and ends the run `completed_with_failures`; a step that fails for good ends it
`failed`, recorded; pause and resume are two named signals and a held run says `held`."""

from __future__ import annotations

import uuid
from typing import Any

from temporalio.api.enums.v1 import EventType

from models.runtime import CustomerRefs, JourneyRunInput, JourneyRunResult, RunSummary
from store.journeys import parse_definition
from tests.harness import engine, identify, track
from workflows.journey import JourneyWorkflow


def _journey(jid: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": jid, "name": jid, "entry": {"event": "Started"}, "steps": steps}


BAD_TEMPLATE = _journey(
    "bad_template",
    [
        {"id": "oops", "kind": "send", "template": {"body": "{{ profile.n + 1 }}"}},
        {"id": "after", "kind": "send", "template": {"body": "still here"}},
    ],
)


async def test_a_failed_send_is_counted_and_the_run_completes_with_failures(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish(BAD_TEMPLATE)
        await eng.send(identify("f1", n="not a number"), track("f1", "Started"))
        handle = await eng.run("bad_template", "f1")
        result = await eng.result(handle)
        assert (result.status, result.failures) == ("completed_with_failures", 1)
        summary = await handle.query(JourneyWorkflow.summary)
        assert summary.status == "completed_with_failures"
        assert [(f.step_id, f.reason) for f in summary.failed] == [("oops", "template_error")]
        row = await db.fetchrow("SELECT status, failures FROM journey_runs")
        assert dict(row) == {"status": "completed_with_failures", "failures": 1}
        # The failed send is a message row (the channel report counts it), with its error.
        msgs = [(m["step_id"], m["status"], m["skip_reason"]) for m in await eng.messages("f1")]
        assert msgs == [("oops", "failed", "template_error"), ("after", "sent", None)]
        failed = (await eng.messages("f1"))[0]
        assert "template error" in failed["error"]


async def test_a_step_that_fails_for_good_ends_the_run_failed_and_recorded(db, dev_env):
    # The dev server: a workflow started by hand on the time-skipping server may see its
    # first task time out while the worker warms up (time skips over it).
    async with engine(db, dev_env) as eng:
        defn = parse_definition(
            _journey(
                "no_profile",
                [
                    {
                        "id": "which",
                        "kind": "branch",
                        "cases": [
                            {
                                "when": {"path": "profile.traits.vip", "op": "eq", "value": True},
                                "next": "end",
                            }
                        ],
                        "else": "end",
                    }
                ],
            )
        )
        handle = await eng.client.start_workflow(
            JourneyWorkflow.run,
            # No such customer: the branch's profile look-up fails for good (InvalidRequest).
            JourneyRunInput(journey=defn, customer_id="ghost", enrollment_id="e-ghost"),
            id=f"journey-no_profile-{uuid.uuid4().hex[:6]}",
            task_queue=eng.task_queue,
            result_type=JourneyRunResult,
        )
        result = await eng.result(handle)
        assert result.status == "failed"
        summary = await handle.query(JourneyWorkflow.summary)
        assert summary.status == "failed"
        assert "step 'which'" in (summary.exit_reason or "")
        assert "not found" in (summary.exit_reason or "")


WAITING = _journey("waiting", [{"id": "nap", "kind": "wait", "duration": "1h"}])


async def test_pause_and_resume_are_named_apart_and_a_held_run_says_held(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish(WAITING)
        await eng.send(track("h1", "Started"))
        handle = await eng.run("waiting", "h1")
        await handle.signal(JourneyWorkflow.pause_run)
        assert (await handle.query(JourneyWorkflow.summary)).status == "held"
        await handle.signal(JourneyWorkflow.resume_run)
        assert (await handle.query(JourneyWorkflow.summary)).status == "running"
        await handle.signal(JourneyWorkflow.hold, True)  # the old signal still works
        assert (await handle.query(JourneyWorkflow.summary)).status == "held"
        await handle.signal(JourneyWorkflow.hold, False)
        names = [
            e.workflow_execution_signaled_event_attributes.signal_name
            async for e in handle.fetch_history_events()
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        ]
        assert names[:2] == ["pause_run", "resume_run"]
        result = await eng.result(handle)
        assert result.status == "completed"


async def test_refs_signal_keeps_the_customer_as_operators_know_them(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish(WAITING)
        await eng.send(identify("r1", email="R1@Example.com"), track("r1", "Started"))
        handle = await eng.run("waiting", "r1")
        summary: RunSummary = await handle.query(JourneyWorkflow.summary)
        assert summary.customer_refs == ["r1", "r1@example.com"]  # from the start
        cid = await eng.customer("r1")
        await handle.signal(JourneyWorkflow.refs, CustomerRefs(customer_id=cid, refs=["r1", "x"]))
        assert (await handle.query(JourneyWorkflow.summary)).customer_refs == ["r1", "x"]
        desc = await handle.describe()
        assert "r1" in (await desc.static_summary() or "")
