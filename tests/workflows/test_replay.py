"""Recorded histories replay without non-determinism; replay does not log twice.

`tests/histories/*.json` are histories of the example journeys recorded with the code of their
time. Every change to workflow code must still replay them (or use `workflow.patched`).
Re-record deliberately with `RECORD_HISTORIES=1 make test`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.harness import engine, identify, track
from workflows.journey import JourneyWorkflow

HISTORIES = Path(__file__).resolve().parent.parent / "histories"


def _replayer() -> Replayer:
    return Replayer(workflows=[JourneyWorkflow], data_converter=pydantic_data_converter)


async def _record_examples(db, ts_env) -> dict[str, WorkflowHistory]:
    out: dict[str, WorkflowHistory] = {}
    async with engine(db, ts_env) as eng:
        await eng.publish_examples("cart_recovery", "welcome_series")
        await eng.send(track("r1", "Product Added", name="Mug"))
        await eng.send(track("r2", "Product Added", name="Pot"))
        await eng.send(identify("r3", email="r3@example.com", first_name="Ria"))
        await eng.send(identify("r4", email="r4@example.com"))
        cart, cart_exit = await eng.run("cart_recovery", "r1"), await eng.run("cart_recovery", "r2")
        welcome_buyer = await eng.run("welcome_series", "r3")
        welcome_nudge = await eng.run("welcome_series", "r4")
        await eng.send(track("r2", "Order Completed"), track("r3", "Order Completed"))
        for name, handle in {
            "cart_recovery_reminders": cart,
            "cart_recovery_purchase_exit": cart_exit,
            "welcome_series_buyer": welcome_buyer,
            "welcome_series_nudge": welcome_nudge,
        }.items():
            await eng.result(handle)
            out[name] = await handle.fetch_history()
    return out


async def test_fresh_histories_of_the_examples_replay(db, ts_env, caplog):
    caplog.set_level(logging.INFO, logger="temporalio.workflow")
    histories = await _record_examples(db, ts_env)
    logged = [r for r in caplog.records if r.getMessage() == "journey.step"]
    assert len(logged) == 4 + 1 + 4 + 4  # steps entered across the four runs
    caplog.clear()
    for history in histories.values():
        await _replayer().replay_workflow(history)
    assert [r for r in caplog.records if r.getMessage().startswith("journey.")] == []
    if os.environ.get("RECORD_HISTORIES") == "1":
        HISTORIES.mkdir(exist_ok=True)
        for name, history in histories.items():
            (HISTORIES / f"{name}.json").write_text(history.to_json())


@pytest.mark.parametrize("path", sorted(HISTORIES.glob("*.json")), ids=lambda p: p.stem)
async def test_recorded_history_replays(path: Path):
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    await _replayer().replay_workflow(history)


def test_recorded_histories_exist():
    names = {p.stem for p in HISTORIES.glob("*.json")}
    assert {"cart_recovery_reminders", "welcome_series_nudge"} <= names
