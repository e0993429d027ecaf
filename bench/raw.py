"""The ceiling: the same two operations as bare Temporal calls on a minimal workflow.

`BenchRawWorkflow` takes events by signal (the first one with signal-with-start, exactly as the
router enters a journey) and, for each, runs one trivial activity that records `time.time()`
and inserts one row into PostgreSQL through asyncpg. Its worker runs inside the bench process
on its own task queue, against the same dev server and database as the app, with the same
(pydantic) data converter and the default workflow sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    import asyncpg

    from bench.stats import summary

MAX_EVENTS_PER_RUN = 1000
MAX_MISSES = 5  # consecutive latency samples that time out: stop the phase
IDLE_TIMEOUT = timedelta(hours=1)

DDL = """
CREATE TABLE IF NOT EXISTS bench_raw_events (
    id bigserial PRIMARY KEY,
    workflow_id text NOT NULL,
    message_id text NOT NULL,
    recorded_at double precision NOT NULL,
    inserted_at timestamptz NOT NULL DEFAULT now()
)
"""


class RawEvent(BaseModel):
    """About the size and shape of the app's `JourneyEvent`."""

    message_id: str
    type: str
    event: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)
    timestamp: datetime
    user_id: str


class RawRecord(BaseModel):
    workflow_id: str
    message_id: str


@workflow.defn(name="BenchRawWorkflow")
class RawWorkflow:
    def __init__(self) -> None:
        self.pending: list[RawEvent] = []

    @workflow.signal
    def event(self, event: RawEvent) -> None:
        self.pending.append(event)

    @workflow.run
    async def run(self, user_id: str) -> int:
        done = 0
        while done < MAX_EVENTS_PER_RUN:
            try:
                await workflow.wait_condition(lambda: bool(self.pending), timeout=IDLE_TIMEOUT)
            except TimeoutError:
                break
            event = self.pending.pop(0)
            await workflow.execute_activity(
                "bench_raw_record",
                RawRecord(workflow_id=workflow.info().workflow_id, message_id=event.message_id),
                start_to_close_timeout=timedelta(seconds=30),
            )
            done += 1
        await workflow.wait_condition(workflow.all_handlers_finished)
        return done


class RawActivities:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.count = 0
        self.waiters: dict[str, asyncio.Future[float]] = {}

    @activity.defn(name="bench_raw_record")
    async def record(self, rec: RawRecord) -> float:
        now = time.time()
        await self.pool.execute(
            "INSERT INTO bench_raw_events (workflow_id, message_id, recorded_at) VALUES ($1,$2,$3)",
            rec.workflow_id,
            rec.message_id,
            now,
        )
        self.count += 1
        fut = self.waiters.pop(rec.message_id, None)
        if fut is not None and not fut.done():
            fut.set_result(now)
        return now


def raw_worker(client: Client, acts: RawActivities, task_queue: str) -> Worker:
    # Same worker settings as the app's (worker.build_worker).
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[RawWorkflow],
        activities=[acts.record],
        max_concurrent_activities=200,
    )


async def signal_with_start(
    client: Client, task_queue: str, workflow_id: str, user_id: str, event: RawEvent
) -> str | None:
    handle = await client.start_workflow(
        RawWorkflow.run,
        user_id,
        id=workflow_id,
        task_queue=task_queue,
        start_signal="event",
        start_signal_args=[event],
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    return handle.result_run_id


def to_raw(e: dict[str, Any]) -> RawEvent:
    return RawEvent(
        message_id=e["messageId"],
        type=e["type"],
        event=e.get("event"),
        properties=e.get("properties") or {},
        timestamp=datetime.fromisoformat(e["timestamp"]),
        user_id=e["userId"],
    )


# -- (c1) ingestion ---------------------------------------------------------------------
async def run_ingestion(
    client: Client,
    acts: RawActivities,
    task_queue: str,
    make_event: Callable[[], dict[str, Any]],
    *,
    tag: str,
    duration: float,
    concurrency: int,
    drain_timeout: float,
) -> dict[str, Any]:
    """Signal-with-start per event from `concurrency` callers for `duration` seconds."""
    accepted = 0
    errors: dict[str, int] = {}
    call_ms: list[float] = []
    done_before = acts.count
    t_start = time.monotonic()
    deadline = t_start + duration
    max_calls = int(duration * 20_000)  # a bound far above anything this box can do

    async def caller() -> None:
        nonlocal accepted, max_calls
        while time.monotonic() < deadline and max_calls > 0:
            max_calls -= 1
            e = make_event()
            t0 = time.monotonic()
            try:
                await signal_with_start(
                    client, task_queue, f"raw-{tag}-{e['userId']}", e["userId"], to_raw(e)
                )
            except Exception as err:
                name = type(err).__name__
                errors[name] = errors.get(name, 0) + 1
                await asyncio.sleep(0.01)
                continue
            call_ms.append((time.monotonic() - t0) * 1000)
            accepted += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    t_end = time.monotonic()
    window = t_end - t_start
    # End to end: every accepted event has run its activity (bounded wait).
    drain_deadline = t_end + drain_timeout
    for _ in range(int(drain_timeout / 0.05) + 1):
        if acts.count - done_before >= accepted or time.monotonic() > drain_deadline:
            break
        await asyncio.sleep(0.05)
    t_done = time.monotonic()
    processed = acts.count - done_before
    drained = processed >= accepted
    return {
        "window_s": round(window, 3),
        "accepted_events": accepted,
        "errors": errors,
        "accepted_per_s": round(accepted / window, 1) if window else None,
        "processed_events": processed,
        "drained": drained,
        "drain_after_window_s": round(t_done - t_end, 3),
        "end_to_end_s": round(t_done - t_start, 3),
        "end_to_end_per_s": round(processed / (t_done - t_start), 1) if drained else None,
        "sws_call_ms": summary(call_ms),
        "concurrency": concurrency,
    }


# -- (c2) latency -------------------------------------------------------------------------
async def run_latency(
    client: Client,
    acts: RawActivities,
    task_queue: str,
    *,
    tag: str,
    samples: int,
    gap: float,
    limit_s: float,
    budget_s: float = 600.0,
) -> list[dict[str, Any]]:
    """One fresh workflow per sample: client SWS call -> the activity's recorded time."""
    out: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    t_begin = time.monotonic()
    misses = 0
    for i in range(samples):
        if time.monotonic() - t_begin > budget_s or misses >= MAX_MISSES:
            break  # the phase's time budget is spent, or the pipeline is stuck
        user = f"raw-lat-{tag}-{i}"
        mid = f"raw-lat-{tag}-{i}-{uuid.uuid4().hex[:8]}"
        fut: asyncio.Future[float] = loop.create_future()
        acts.waiters[mid] = fut
        event = RawEvent(
            message_id=mid,
            type="track",
            event="Signed Up",
            properties={"plan": "free"},
            timestamp=datetime.now(UTC),
            user_id=user,
        )
        wid = f"raw-lat-{tag}-{i}"
        t0 = time.time()
        run_id = await signal_with_start(client, task_queue, wid, user, event)
        t_call = time.time()
        sample: dict[str, Any] = {"i": i, "workflow_id": wid, "run_id": run_id, "t0": t0}
        sample["call_ms"] = (t_call - t0) * 1000
        try:
            t_act = await asyncio.wait_for(fut, limit_s)
            sample["t_activity"] = t_act
            sample["latency_ms"] = (t_act - t0) * 1000
            misses = 0
        except TimeoutError:
            acts.waiters.pop(mid, None)
            sample["timeout"] = True
            misses += 1
        out.append(sample)
        if gap:
            await asyncio.sleep(gap)
    return out


async def ensure_table(pool: asyncpg.Pool) -> None:
    with contextlib.suppress(asyncpg.DuplicateTableError):
        await pool.execute(DDL)
