"""A cancel reaches an audience launch while it waits out its rate between pages (time-skipping
server: the rate wait is long, so a launch that only looked at the flag after it would show)."""

from __future__ import annotations

import uuid
from datetime import timedelta

from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus

from models.runtime import LaunchInput, LaunchProgress
from tests.conftest import eventually
from tests.harness import engine
from workflows.launch import LaunchWorkflow

JOURNEY = {
    "id": "promo_slow",
    "name": "Promo, slowly",
    "entry": {"event": "Promo Requested"},
    "steps": [{"id": "offer", "kind": "send", "template": {"body": "offer"}}],
}


async def test_cancel_stops_a_launch_during_its_rate_wait(db, ts_env):
    await db.executemany(
        "INSERT INTO customers (id, traits) VALUES ($1, $2)", [(f"c{i}", {}) for i in range(3)]
    )
    # One customer per page at one per 1,000 s: the launch waits 1,000 s after each page.
    rate_wait = timedelta(seconds=1000)
    async with engine(db, ts_env) as eng:
        await eng.publish(JOURNEY)
        handle = await eng.client.start_workflow(
            LaunchWorkflow.run,
            LaunchInput(
                journey_id="promo_slow", rate_per_second=0.001, page_size=1, launch_id="slow"
            ),
            id=f"launch-{uuid.uuid4().hex[:8]}",
            task_queue=eng.task_queue,
        )

        async def first_page_done() -> bool:
            return (await handle.query(LaunchWorkflow.progress)).pages == 1

        await eventually(first_page_done, what="the first page")

        async def run_finished() -> bool:
            # The enrolled customer's run is done, so nothing else has timers to skip over.
            status = await db.fetchval("SELECT status FROM journey_runs WHERE customer_id = 'c0'")
            return status == "completed"

        await eventually(run_finished, what="the enrolled run to finish")
        started = await ts_env.get_current_time()
        await handle.signal(LaunchWorkflow.cancel)

        async def stopped() -> LaunchProgress | None:
            # Time is not skipped here: a launch that only sees the cancel after its rate
            # wait (1,000 s of server time) never gets there.
            progress = await handle.query(LaunchWorkflow.progress)
            return progress if progress.status != "running" else None

        await eventually(stopped, what="the launch to stop")

        async def closed() -> bool:
            # Waited for without `result()`, which would let the server skip time (and, with an
            # activity in flight and no timer left, it may jump years ahead).
            desc = await handle.describe()
            return desc.status == WorkflowExecutionStatus.COMPLETED

        await eventually(closed, what="the launch workflow to complete")
        assert await ts_env.get_current_time() - started < rate_wait
        progress: LaunchProgress = await handle.result()
        assert progress.status == "cancelled"
        assert (progress.pages, progress.enrolled) == (1, 1)
        # The rate wait's timer was cancelled; it never fired.
        kinds = [e.event_type async for e in handle.fetch_history_events()]
        assert EventType.EVENT_TYPE_TIMER_CANCELED in kinds
        assert EventType.EVENT_TYPE_TIMER_FIRED not in kinds
        row = await db.fetchrow("SELECT status, enrolled FROM launches WHERE id = 'slow'")
        assert (row["status"], row["enrolled"]) == ("cancelled", 1)
