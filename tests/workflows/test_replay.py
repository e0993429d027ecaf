"""Recorded histories replay without non-determinism; replay does not log twice.

`tests/histories/<release>/*.json` are histories recorded with the workflow code of that
release (see tests/histories/README.md). Every change to workflow code must still replay all of
them, or take its new path behind `workflow.patched`. Record the current release's histories
deliberately with `RECORD_HISTORIES=1` (written under `RELEASE`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from models.runtime import CustomerRefs, JourneyRunResult
from tests.harness import Engine, engine, identify, track
from workflows.journey import JourneyWorkflow, workflow_id_for
from workflows.launch import LaunchWorkflow

HISTORIES = Path(__file__).resolve().parent.parent / "histories"
# The directory new recordings go to; a new one per release that changes workflow code.
RELEASE = "r4-visible-status"
RECORDED = sorted(HISTORIES.glob("*/*.json"))

# Step kinds the examples do not use, in one journey: update_profile, webhook, goto, exit.
KINDS_TOUR: dict[str, Any] = {
    "id": "kinds_tour",
    "name": "Kinds tour",
    "entry": {"event": "Tour Started"},
    "steps": [
        {"id": "tag", "kind": "update_profile", "add_tags": ["toured"]},
        {"id": "hook", "kind": "webhook", "url": "{receiver}/hook", "payload": {"n": 1}},
        {"id": "pause", "kind": "wait", "duration": "1h"},
        {"id": "again", "kind": "goto", "target": "pause", "max_iterations": 2},
        {"id": "gold", "kind": "branch", "cases": [
            {"when": {"path": "results.hook.body.segment", "op": "eq", "value": "gold"},
             "next": "bye"}], "else": "end"},
        {"id": "bye", "kind": "exit", "reason": "toured"},
    ],
}  # fmt: skip


def replayer() -> Replayer:
    return Replayer(
        workflows=[JourneyWorkflow, LaunchWorkflow], data_converter=pydantic_data_converter
    )


def save(histories: dict[str, WorkflowHistory]) -> None:
    """Write histories under the current release when asked to (RECORD_HISTORIES=1)."""
    if os.environ.get("RECORD_HISTORIES") != "1":
        return
    (HISTORIES / RELEASE).mkdir(parents=True, exist_ok=True)
    for name, history in histories.items():
        (HISTORIES / RELEASE / f"{name}.json").write_text(history.to_json())


async def _finish(
    eng: Engine, runs: dict[str, tuple[str, str, str | None]]
) -> dict[str, WorkflowHistory]:
    out = {}
    for name, (journey, ref, key) in runs.items():
        wid = workflow_id_for(journey, await eng.customer(ref), key)
        handle = eng.client.get_workflow_handle(wid, result_type=JourneyRunResult)
        await eng.result(handle)
        out[name] = await handle.fetch_history()
    return out


async def _record_examples(db, ts_env, receiver: str) -> dict[str, WorkflowHistory]:
    """Runs of the example journeys (and the kinds tour) covering every step kind but
    handoff: wait (duration, until), wait_for, branch, send, split, holdout, score, goto,
    update_profile, webhook, exit; goals and exit_on."""
    async with engine(db, ts_env) as eng:
        await eng.publish_examples()
        tour = {**KINDS_TOUR, "steps": [dict(s) for s in KINDS_TOUR["steps"]]}
        tour["steps"][1]["url"] = f"{receiver}/hook"
        await eng.publish(tour)
        now = await ts_env.get_current_time()
        await eng.send(
            track("r1", "Product Added", name="Mug"),
            track("r2", "Product Added", name="Pot"),
            identify("r3", email="r3@example.com", first_name="Ria"),
            identify("r4", email="r4@example.com"),
            *[track("r5", "Order Completed", revenue=300) for _ in range(4)],
            track("r6", "Customer Lapsed"),
            track("r7", "Signed Up"),
            track("r8", "Appointment Booked", appointment_id="A",
                  start_time=now.replace(year=now.year + 1).isoformat()),
            track("r9", "Tour Started"),
        )  # fmt: skip
        await eng.send(
            track("r2", "Order Completed"),
            track("r3", "Order Completed"),
            track("r7", "Account Connected"),
        )
        return await _finish(
            eng,
            {
                "cart_recovery_reminders": ("cart_recovery", "r1", None),
                "cart_recovery_purchase_exit": ("cart_recovery", "r2", None),
                "welcome_series_buyer": ("welcome_series", "r3", None),
                "welcome_series_nudge": ("welcome_series", "r4", None),
                "post_purchase_cross_sell_premium": ("post_purchase_cross_sell", "r5", None),
                "win_back_lapsed": ("win_back", "r6", None),
                "onboarding_connected": ("onboarding", "r7", None),
                "appointment_reminders_both": ("appointment_reminders", "r8", "A"),
                "kinds_tour": ("kinds_tour", "r9", None),
            },
        )


async def test_fresh_histories_of_the_examples_replay(db, ts_env, receiver, caplog):
    caplog.set_level(logging.INFO, logger="temporalio.workflow")
    histories = await _record_examples(db, ts_env, receiver)
    assert [r for r in caplog.records if r.getMessage() == "journey.step"]
    caplog.clear()
    for history in histories.values():
        await replayer().replay_workflow(history)
    assert [r for r in caplog.records if r.getMessage().startswith("journey.")] == []
    save(histories)


# What the `journey-visible-status` patch adds, in one run: a failed send, a pause and a
# resume (pause_run / resume_run), the customer's refs changing, completed_with_failures.
VISIBLE_TOUR: dict[str, Any] = {
    "id": "visible_tour",
    "name": "Visible tour",
    "entry": {"event": "Tour Started"},
    "steps": [
        {"id": "oops", "kind": "send", "template": {"body": "{{ profile.n + 1 }}"}},
        {"id": "nap", "kind": "wait", "duration": "1h"},
        {"id": "fine", "kind": "send", "template": {"body": "hello"}},
    ],
}


async def test_fresh_histories_of_visible_runs_replay(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish(VISIBLE_TOUR)
        await eng.send(identify("v1", email="v1@example.com", n="x"), track("v1", "Tour Started"))
        handle = await eng.run("visible_tour", "v1")
        cid = await eng.customer("v1")
        await handle.signal(JourneyWorkflow.pause_run)
        await handle.signal(JourneyWorkflow.refs, CustomerRefs(customer_id=cid, refs=["v1", "v"]))
        await handle.signal(JourneyWorkflow.resume_run)
        result = await eng.result(handle)
        assert (result.status, result.failures) == ("completed_with_failures", 1)
        history = await handle.fetch_history()
    await replayer().replay_workflow(history)
    save({"visible_tour": history})


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: f"{p.parent.name}/{p.stem}")
async def test_recorded_history_replays(path: Path):
    """Every history of every release replays with the current workflow code."""
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    await replayer().replay_workflow(history)


def test_recorded_histories_of_each_release_exist():
    releases = {p.parent.name for p in RECORDED}
    assert {"r1-1d619a8", "r2-138417b", "r3-bounded-state", RELEASE} <= releases
    assert "visible_tour" in {p.stem for p in RECORDED if p.parent.name == RELEASE}
    names = {p.stem for p in RECORDED if p.parent.name == "r2-138417b"}
    assert {"cart_recovery_reminders", "win_back_lapsed", "kinds_tour"} <= names
