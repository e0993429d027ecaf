"""What /health reports: PostgreSQL, Temporal, a live worker and router lag, each on its own.

The API answering is not the engine working: with the worker down, events are stored but never
routed and no journey moves. So /health is "ok" (200) only when PostgreSQL and Temporal answer
and a worker polls the task queue, and otherwise 503 with each check's details. /health/live
stays trivial (the process serves HTTP) for load balancers and process supervisors, which must
not take the API out of rotation because the worker is down.

A live worker is read from Temporal, so no table or heartbeat writer is needed:
- `DescribeTaskQueue` lists the identities polling the task queue and when each last began a
  poll. A worker long-polls continuously (a poll lasts up to a minute), so an alive worker's
  last poll is less than `POLL_WINDOW` old. Temporal keeps a poller listed for minutes after
  it is gone, which is why the age matters.
- `ListWorkers` (worker heartbeats, Temporal server >= 1.29; the SDK sends one when a worker
  shuts down) marks a worker that stopped cleanly as gone at once; a killed one is noticed when
  its last poll ages past `POLL_WINDOW`. A server without that API just lacks the shortcut.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
from pydantic import BaseModel, Field
from temporalio.api.enums.v1 import TaskQueueType, WorkerStatus
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest, ListWorkersRequest
from temporalio.client import Client
from temporalio.service import RPCError

from core.logs import get_logger
from store.listing import oldest_unrouted

log = get_logger("api.health")
# A worker's polls begin at most ~60 s apart while it is alive (Temporal's long-poll timeout).
POLL_WINDOW = timedelta(seconds=90)
# The router is late when an event has waited this long (it routes within a second normally).
ROUTER_LAG_LIMIT = timedelta(minutes=5)
# Each check's own deadline: /health answers even when a dependency hangs.
CHECK_TIMEOUT = timedelta(seconds=3)
_GONE = (WorkerStatus.WORKER_STATUS_SHUTTING_DOWN, WorkerStatus.WORKER_STATUS_SHUTDOWN)


class Check(BaseModel):
    ok: bool
    detail: str = ""


class WorkerCheck(Check):
    task_queue: str
    pollers: list[str] = Field(
        default_factory=list, description="identities of the workers polling now"
    )
    last_poll_at: datetime | None = None


class RouterCheck(Check):
    unrouted: int | None = Field(default=None, description="events waiting in the outbox")
    oldest_unrouted_seconds: float | None = Field(
        default=None, description="age of the oldest, since it arrived"
    )


class HealthChecks(BaseModel):
    postgres: Check
    temporal: Check
    worker: WorkerCheck
    router: RouterCheck


class Health(BaseModel):
    status: str = Field(description="ok | unavailable (then HTTP 503)")
    checks: HealthChecks


async def _postgres(pool: asyncpg.Pool) -> tuple[Check, RouterCheck]:
    try:
        await pool.fetchval("SELECT 1", timeout=CHECK_TIMEOUT.total_seconds())
        n, age = await asyncio.wait_for(oldest_unrouted(pool), CHECK_TIMEOUT.total_seconds())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as err:
        why = f"{type(err).__name__}: {err}"
        return Check(ok=False, detail=why), RouterCheck(ok=False, detail="PostgreSQL: " + why)
    late = age is not None and age > ROUTER_LAG_LIMIT.total_seconds()
    return Check(ok=True), RouterCheck(
        ok=not late,
        detail=f"the oldest unrouted event is over {ROUTER_LAG_LIMIT} old" if late else "",
        unrouted=n,
        oldest_unrouted_seconds=age,
    )


async def _stopped_workers(client: Client, namespace: str, task_queue: str) -> dict[str, datetime]:
    """Identity -> when it reported stopping, for workers of `task_queue` that stopped cleanly."""
    try:
        query = f"TaskQueue = '{task_queue}'"
        resp = await client.workflow_service.list_workers(
            ListWorkersRequest(namespace=namespace, page_size=200, query=query),
            timeout=CHECK_TIMEOUT,
        )
    except RPCError as err:
        # An older server, or worker heartbeats turned off: the age of the polls alone tells.
        log.debug("health.list_workers_unavailable", status=str(err.status), error=err.message)
        return {}
    out: dict[str, datetime] = {}
    for info in resp.workers_info:
        beat = info.worker_heartbeat
        if beat.status in _GONE:
            at = beat.heartbeat_time.ToDatetime(tzinfo=UTC)
            out[beat.worker_identity] = max(at, out.get(beat.worker_identity, at))
    return out


async def _temporal(client: Client, namespace: str, task_queue: str) -> tuple[Check, WorkerCheck]:
    if "'" in task_queue or "\\" in task_queue:  # never in a configured queue; keeps it quoted
        raise ValueError(f"task queue {task_queue!r}")
    try:
        resp = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=namespace,
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            ),
            timeout=CHECK_TIMEOUT,
        )
        stopped = await _stopped_workers(client, namespace, task_queue)
    except RPCError as err:
        why = f"{err.status.name if err.status else 'error'}: {err.message}"
        return Check(ok=False, detail=why), WorkerCheck(
            ok=False, task_queue=task_queue, detail="Temporal: " + why
        )
    now = datetime.now(UTC)
    polls = [(p.identity, p.last_access_time.ToDatetime(tzinfo=UTC)) for p in resp.pollers]
    alive = [
        (who, at)
        for who, at in polls
        if now - at < POLL_WINDOW and not (who in stopped and stopped[who] >= at)
    ]
    last = max((at for _, at in polls), default=None)
    detail = (
        ""
        if alive
        else f"no worker polls task queue {task_queue!r}: events are stored but not routed, "
        "and no journey moves"
    )
    return Check(ok=True), WorkerCheck(
        ok=bool(alive),
        task_queue=task_queue,
        pollers=sorted({who for who, _ in alive}),
        last_poll_at=last,
        detail=detail,
    )


async def check(pool: asyncpg.Pool, client: Client, namespace: str, task_queue: str) -> Health:
    """All checks, concurrently, each within `CHECK_TIMEOUT`."""
    (postgres, router), (temporal, worker) = await asyncio.gather(
        _postgres(pool), _temporal(client, namespace, task_queue)
    )
    checks = HealthChecks(postgres=postgres, temporal=temporal, worker=worker, router=router)
    ok = all(c.ok for c in (postgres, temporal, worker, router))
    return Health(status="ok" if ok else "unavailable", checks=checks)
