"""Runs in flight survive a new release: definitions in history load leniently, and a behaviour
change of workflow code takes its new path behind `workflow.patched` only in new runs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

import workflows.journey as journey_workflow
from models.journey import JourneyDefinition
from models.runtime import JourneyEvent, JourneyRunInput, JourneyRunResult, SteerCommand
from tests.conftest import eventually
from tests.harness import engine, track
from tests.workflows.test_replay import HISTORIES, replayer, save
from workflows.journey import JourneyWorkflow

BIG = 40_000  # bytes of the webhook answer: over the per-result cap, under the webhook's own

# A webhook answers a large body; a later branch looks inside it.
BIG_RESULT: dict[str, Any] = {
    "id": "big_result",
    "name": "Big result",
    "entry": {"event": "Big Started"},
    "steps": [
        {"id": "hook", "kind": "webhook", "url": "{receiver}/hook",
         "payload": {"blob": "{{ 'x' * " + str(BIG) + " }}"}},
        {"id": "look", "kind": "branch", "cases": [
            {"when": {"path": "results.hook.body.echo.blob", "op": "starts_with", "value": "x"},
             "next": "thanks"}], "else": "end"},
        {"id": "thanks", "kind": "send", "template": {"body": "thanks"}},
    ],
}  # fmt: skip
OLD_BIG_RESULT = HISTORIES / "r2-138417b" / "big_result_branch.json"


def big_result(receiver: str) -> dict[str, Any]:
    defn = json.loads(json.dumps(BIG_RESULT))
    defn["steps"][0]["url"] = f"{receiver}/hook"
    return defn


# What an older release may have published: fields this release dropped (unknown now), and
# values a validator of this release refuses (tightened bounds, stricter patterns and rules).
OLD_DEFINITION: dict[str, Any] = {
    "id": "legacy",
    "name": "Legacy",
    "owner_team": "growth",  # a field this release no longer has
    "entry": {"event": "Legacy Started", "sampling": 1.0},
    "steps": [
        {"id": "check", "kind": "branch", "cases": [
            # `gt` with a list: refused at publish now, false when evaluated.
            {"when": {"path": "entry.properties.tier", "op": "gt", "value": [1, 2],
                      "note": "old"}, "next": "end"}], "else": "hello"},
        {"id": "hello", "kind": "send", "template": {"body": "hello", "format": "text"},
         "topic": "Weekly News"},  # topic pattern
        {"id": "hook", "kind": "webhook", "url": "{receiver}/hook", "timeout_seconds": 90},
        {"id": "Tag", "kind": "update_profile", "add_tags": ["legacy"], "merge": True},
        # Bounds: max_iterations must be at least 1 now (0: go on at once).
        {"id": "again", "kind": "goto", "target": "Tag", "max_iterations": 0, "next": "end"},
    ],
}  # fmt: skip


def old_definition(receiver: str = "http://127.0.0.1:9") -> dict[str, Any]:
    defn = json.loads(json.dumps(OLD_DEFINITION))
    defn["steps"][2]["url"] = f"{receiver}/hook"
    return defn


def test_publish_refuses_what_a_run_loads_from_history():
    data = old_definition()
    with pytest.raises(ValidationError) as err:
        JourneyDefinition.model_validate(data)
    refused = {".".join(str(x) for x in e["loc"]) for e in err.value.errors()}
    assert "owner_team" in refused and "steps.4.goto.max_iterations" in refused
    # The workflow input as the worker decodes it from history (same converter, no context).
    converter = pydantic_data_converter.payload_converter
    payloads = converter.to_payloads(
        [{"journey": data, "customer_id": "c1", "enrollment_id": "e1", "dropped": True}]
    )
    [inp] = converter.from_payloads(payloads, [JourneyRunInput])
    journey = inp.journey
    assert [s.id for s in journey.steps] == ["check", "hello", "hook", "Tag", "again"]
    assert journey.step("again").max_iterations == 0
    assert journey.step("hook").timeout_seconds == 90
    assert journey.step("hello").topic == "Weekly News"
    assert "owner_team" not in journey.model_dump()
    # An operator's migrate carries a definition the same way (a workflow update's input).
    payloads = converter.to_payloads(
        [{"action": "migrate", "reason": "v2", "step_id": "hello", "definition": data}]
    )
    [cmd] = converter.from_payloads(payloads, [SteerCommand])
    assert cmd.definition is not None and cmd.definition.step("Tag").kind == "update_profile"


async def test_a_run_of_such_a_definition_goes_on(db, ts_env, receiver):
    await db.execute("INSERT INTO customers (id, traits) VALUES ('legacy-c', '{}')")
    wid = "journey-legacy-legacy-c"
    entry = JourneyEvent.model_validate(
        {"message_id": "m-legacy", "type": "track", "event": "Legacy Started",
         "timestamp": "2026-01-01T00:00:00Z", "customer_id": "legacy-c"}
    )  # fmt: skip
    async with engine(db, ts_env) as eng:
        # Started as an older release's router would have: the raw definition as input.
        handle = await eng.client.start_workflow(
            "JourneyWorkflow",
            {"journey": old_definition(receiver), "customer_id": "legacy-c",
             "enrollment_id": f"{wid}:m-legacy", "events": [entry.model_dump(mode="json")]},
            id=wid,
            task_queue=eng.task_queue,
            result_type=JourneyRunResult,
        )  # fmt: skip

        async def finished() -> bool:
            # No timers: nothing to skip. A run whose input does not decode retries its first
            # workflow task forever instead.
            status = (await handle.describe()).status
            return status is not None and status != WorkflowExecutionStatus.RUNNING

        await eventually(finished, what="the run to finish")
        result = await handle.result()
        assert (result.status, result.sends) == ("completed", 1)
        assert result.steps == ["check", "hello", "hook", "Tag", "again"]
        summary = await handle.query(JourneyWorkflow.summary)
        assert summary.results["hook"]["status"] == 200
    await replayer().replay_workflow(await handle.fetch_history())


async def test_an_old_history_keeps_its_path_that_the_patch_would_change(monkeypatch):
    """Recorded before state bounding: the webhook's large answer was kept whole and the branch
    took `thanks`. Replayed with this code it still does; forced onto the new path it would not
    (so the history really exercises the patched code)."""
    history = WorkflowHistory.from_json("old", OLD_BIG_RESULT.read_text())
    await replayer().replay_workflow(history)
    monkeypatch.setattr(workflow, "patched", lambda patch_id: True)
    result = await Replayer(
        workflows=[JourneyWorkflow], data_converter=pydantic_data_converter
    ).replay_workflow(history, raise_on_replay_failure=False)
    assert isinstance(result.replay_failure, NondeterminismError)


async def test_new_runs_take_the_patched_path(db, ts_env, receiver):
    async with engine(db, ts_env) as eng:
        await eng.publish(big_result(receiver))
        await eng.send(track("big", "Big Started"))
        handle = await eng.run("big_result", "big")
        result = await eng.result(handle)
        history = await handle.fetch_history()
        save({"big_result_branch": history})
        summary = await handle.query(JourneyWorkflow.summary)
    markers = [
        e.marker_recorded_event_attributes
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
    ]
    assert any(
        m.marker_name == "core_patch"
        and journey_workflow.BOUNDED_STATE.encode() in m.details["patch-data"].payloads[0].data
        for m in markers
    )
    hook = summary.results["hook"]
    assert (hook["status"], hook["ok"], hook["body"]["segment"]) == (200, True, "gold")
    assert hook["body"]["echo"]["blob"] == {"truncated": True, "bytes": BIG + 2}
    # The branch saw no blob: the run ended instead of thanking.
    assert result.steps == ["hook", "look"]
    await replayer().replay_workflow(history)
