"""A run's state is bounded in bytes, not only in count: a journey that loops 1,000 times
through a webhook with a large answer keeps a short step history (plus a count of what it
dropped), a capped `results.<step>`, and continues-as-new before its history grows large."""

from __future__ import annotations

from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus

from models.journey import JourneyDefinition
from models.runtime import JourneyEvent, JourneyRunInput, JourneyRunResult
from tests.conftest import eventually
from tests.harness import engine
from workflows.journey import HISTORY_BYTES_LIMIT, HISTORY_KEEP, RESULT_BYTES, JourneyWorkflow

LOOPS = 1000
BLOB = 40_000  # the webhook echoes it back: about 40 KB per answer, 40 MB over the run
# What a continue-as-new may carry for this journey: the kept step history and one capped
# result, with room to spare; the unbounded state was several times this.
STATE_BOUND = 64 * 1024


def _loop(receiver: str) -> dict[str, Any]:
    return {
        "id": "big_loop",
        "name": "Big loop",
        "entry": {"event": "Loop Started"},
        "steps": [
            {"id": "hook", "kind": "webhook", "url": f"{receiver}/hook",
             "payload": {"blob": "{{ 'x' * " + str(BLOB) + " }}"}},
            {"id": "again", "kind": "goto", "target": "hook", "max_iterations": LOOPS},
        ],
    }  # fmt: skip


async def test_a_long_loop_with_large_results_stays_bounded(db, ts_env, receiver):
    await db.execute("INSERT INTO customers (id, traits) VALUES ('looper', '{}')")
    wid = "journey-big_loop-looper"
    entry = JourneyEvent.model_validate(
        {"message_id": "m-loop", "type": "track", "event": "Loop Started",
         "timestamp": "2026-01-01T00:00:00Z", "customer_id": "looper"}
    )  # fmt: skip
    async with engine(db, ts_env) as eng:
        # Started directly: publishing refuses a loop without a wait, and with no timers
        # there is no time to skip.
        handle = await eng.client.start_workflow(
            JourneyWorkflow.run,
            JourneyRunInput(
                journey=JourneyDefinition.model_validate(_loop(receiver)),
                customer_id="looper",
                enrollment_id=f"{wid}:m-loop",
                events=[entry],
            ),
            id=wid,
            task_queue=eng.task_queue,
        )

        async def finished() -> bool:
            desc = await eng.client.get_workflow_handle(wid).describe()
            return desc.status == WorkflowExecutionStatus.COMPLETED

        await eventually(finished, within=300, what="the loop to finish")
        result: JourneyRunResult = await eng.client.get_workflow_handle(
            wid, result_type=JourneyRunResult
        ).result()
        summary = await eng.client.get_workflow_handle(wid).query(JourneyWorkflow.summary)

        # Every run of the chain: what it carried over, and how large its history grew.
        carried: list[int] = []
        sizes: list[int] = []
        run_id: str | None = handle.first_execution_run_id
        while run_id:
            history = await eng.client.get_workflow_handle(wid, run_id=run_id).fetch_history()
            sizes.append(
                max(
                    e.workflow_task_started_event_attributes.history_size_bytes
                    for e in history.events
                    if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED
                )
            )
            last = history.events[-1]
            if last.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                break
            attrs = last.workflow_execution_continued_as_new_event_attributes
            carried.append(sum(len(p.data) for p in attrs.input.payloads))
            run_id = attrs.new_execution_run_id

    assert result.status == "completed"
    # hook and again entered LOOPS + 1 times each; the oldest entries are counted, not kept.
    assert len(result.steps) <= HISTORY_KEEP
    assert len(result.steps) + result.steps_dropped == 2 * (LOOPS + 1)
    assert result.steps[-2:] == ["hook", "again"]
    assert summary.history_dropped == result.steps_dropped
    hook = summary.results["hook"]
    assert (hook["status"], hook["ok"]) == (200, True)
    assert hook["body"]["echo"]["blob"] == {"truncated": True, "bytes": BLOB + 2}
    assert result.continued == len(carried)
    assert carried and max(carried) < STATE_BOUND, carried
    # Continued-as-new on history bytes: no run grew past the limit by more than one step.
    assert max(sizes) < HISTORY_BYTES_LIMIT + 4 * BLOB, sizes
    assert RESULT_BYTES < BLOB
