"""The outbox router: stored events → identity + profile → journey signals.

The API only commits events to PostgreSQL (durable once it answers 200). This loop, running in
the worker process, takes unrouted events in timestamp order and, per chunk:

1. in one transaction: resolves each event to a customer, applies traits, and decides which
   runs to signal and which to start (an enrollment row, keyed by the entry event, is written
   before the run is started);
2. calls Temporal: signals for running journeys, signal-with-start for entries;
3. in a second transaction: records the started runs and marks the events routed.

A crash or an outage anywhere leaves the events unrouted, so the chunk is routed again:
identities already exist (same customer), a run already started under the same enrollment is
signalled rather than started twice, and a workflow drops events it has seen (`messageId`).
One router is active at a time (advisory lock), which keeps a customer's events in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.service import RPCError, RPCStatusCode

from core.temporal import CUSTOMER_ID, JOURNEY_ID, JOURNEY_STATUS, JOURNEY_STEP, JOURNEY_VERSION
from models.durations import parse_duration
from models.journey import EventMatch, JourneyDefinition
from models.runtime import JourneyEvent, JourneyRunInput
from store.events import NOTIFY_CHANNEL
from store.journeys import active_definitions
from store.profiles import StoredEvent, resolve_and_apply
from workflows.journey import workflow_id_for

log = structlog.stdlib.get_logger("router")

LEADER_LOCK = 7_270_001
_SELECT = """
SELECT id, message_id, type, event, user_id, anonymous_id, previous_id, timestamp, payload
FROM events WHERE routed_at IS NULL ORDER BY timestamp, id LIMIT $1
"""
_ENROLL = """
INSERT INTO journey_runs (enrollment_id, workflow_id, journey_id, journey_version, customer_id,
                          status)
VALUES ($1, $2, $3, $4, $5, 'starting')
ON CONFLICT (enrollment_id) DO UPDATE SET enrollment_id = EXCLUDED.enrollment_id
RETURNING status
"""


def journey_event(e: StoredEvent) -> JourneyEvent:
    p = e.payload
    props = p.get("properties") if isinstance(p.get("properties"), dict) else {}
    traits = p.get("traits") if isinstance(p.get("traits"), dict) else {}
    if e.type in ("page", "screen") and p.get("name"):
        props = {"name": p["name"], **props}
    return JourneyEvent(
        message_id=e.message_id,
        type=e.type,
        event=e.event,
        properties=props,
        traits=traits,
        timestamp=e.timestamp,
        customer_id=e.customer_id,
    )


def _names(matches: list[EventMatch]) -> set[tuple[str, str | None]]:
    return {(m.type, m.event) for m in matches}


def _hits(keys: set[tuple[str, str | None]], e: JourneyEvent) -> bool:
    return (e.type, e.event) in keys or (e.type, None) in keys


@dataclass
class _Start:
    journey: JourneyDefinition
    customer_id: str
    enrollment_id: str
    events: list[JourneyEvent]
    run_id: str | None = None


@dataclass
class _Signal:
    workflow_id: str
    enrollment_id: str
    journey: JourneyDefinition
    customer_id: str
    events: list[JourneyEvent]


@dataclass
class _Plan:
    signals: list[_Signal] = field(default_factory=list)
    starts: list[_Start] = field(default_factory=list)
    reassign: list[tuple[str, str]] = field(default_factory=list)


class EventRouter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        client: Client,
        *,
        task_queue: str,
        batch_size: int = 2000,
        history_limit: int = 2000,
        concurrency: int = 64,
    ) -> None:
        self.pool = pool
        self.client = client
        self.task_queue = task_queue
        self.batch_size = batch_size
        self.history_limit = history_limit
        self._sem = asyncio.Semaphore(concurrency)
        self._journeys: list[JourneyDefinition] = []
        self._journeys_stale = True
        self._wake = asyncio.Event()

    # -- loop ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Route until `stop` is set, surviving database restarts."""
        backoff = 0.2
        while not stop.is_set():
            try:
                await self._lead(stop)
                backoff = 0.2
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
                log.warning("router.connection_lost", error=str(err), retry_in=backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)

    async def _lead(self, stop: asyncio.Event) -> None:
        conn: asyncpg.Connection = await self.pool.acquire()
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2.0)
                if stop.is_set():
                    return
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
            await conn.add_listener("journeys_changed", self._on_journeys)
            self._journeys_stale = True
            log.info("router.leader")
            backoff = 0.2
            while not stop.is_set():
                if conn.is_closed():
                    return  # lost the lock with the connection: become leader again
                try:
                    n = await self.route_once()
                    backoff = 0.2
                except Exception:
                    log.exception("router.error", retry_in=backoff)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                if n >= self.batch_size:
                    continue
                self._wake.clear()
                # NOTIFY wakes us at once; the timeout is a safety net for a lost notification.
                waiters = [
                    asyncio.ensure_future(self._wake.wait()),
                    asyncio.ensure_future(stop.wait()),
                ]
                await asyncio.wait(waiters, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
        finally:
            if not conn.is_closed():
                with contextlib.suppress(Exception):
                    await conn.execute("SELECT pg_advisory_unlock_all()")
            with contextlib.suppress(Exception):
                await self.pool.release(conn)

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    def _on_journeys(self, *_: Any) -> None:
        self._journeys_stale = True
        self._wake.set()

    # -- one chunk -------------------------------------------------------------------
    async def route_once(self) -> int:
        if self._journeys_stale:
            self._journeys_stale = False
            self._journeys = await active_definitions(self.pool)
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                rows = await conn.fetch(_SELECT, self.batch_size)
                if not rows:
                    return 0
                events = [StoredEvent(**dict(r)) for r in rows]
                resolution = await resolve_and_apply(conn, events)
                plan = await self._plan(conn, events)
                plan.reassign = [
                    (w, m.survivor) for m in resolution.merges for w in m.moved_running
                ]
            await self._execute(plan)
            async with conn.transaction():
                await conn.executemany(
                    "UPDATE journey_runs SET run_id = $2, status = 'running' "
                    "WHERE enrollment_id = $1 AND status = 'starting'",
                    [(s.enrollment_id, s.run_id) for s in plan.starts],
                )
                await conn.execute(
                    "UPDATE events SET routed_at = now() WHERE id = ANY($1::bigint[])",
                    [e.id for e in events],
                )
        log.debug("router.routed", events=len(events), starts=len(plan.starts))
        return len(events)

    async def _plan(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> _Plan:
        plan = _Plan()
        if not self._journeys:
            return plan
        by_customer: dict[str, list[JourneyEvent]] = defaultdict(list)
        for e in events:
            by_customer[e.customer_id].append(journey_event(e))
        active: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        starting: dict[tuple[str, str], list[str]] = defaultdict(list)
        last: dict[tuple[str, str], datetime] = {}
        for r in await conn.fetch(
            "SELECT customer_id, journey_id, workflow_id, enrollment_id, status, started_at "
            "FROM journey_runs WHERE customer_id = ANY($1::text[])",
            list(by_customer),
        ):
            key = (r["customer_id"], r["journey_id"])
            if r["status"] == "running":
                active[key].append((r["workflow_id"], r["enrollment_id"]))
            elif r["status"] == "starting":
                # Written, but the router stopped before recording the start: start again
                # (signal-with-start joins the run if it did start).
                starting[key].append(r["enrollment_id"])
            if key not in last or r["started_at"] > last[key]:
                last[key] = r["started_at"]
        for journey in self._journeys:
            keys = _names([journey.entry]) | _names(journey.interesting())
            for cid, jevs in by_customer.items():
                relevant = [e for e in jevs if _hits(keys, e)]
                if not relevant:
                    continue
                for enrollment in starting.get((cid, journey.id), []):
                    plan.starts.append(_Start(journey, cid, enrollment, relevant))
                runs = active.get((cid, journey.id)) or []
                if runs or (cid, journey.id) in starting:
                    plan.signals.extend(
                        _Signal(wid, enrollment, journey, cid, relevant) for wid, enrollment in runs
                    )
                elif start := await self._enroll(
                    conn, journey, cid, relevant, last.get((cid, journey.id))
                ):
                    plan.starts.append(start)
        return plan

    async def _enroll(
        self,
        conn: asyncpg.Connection,
        journey: JourneyDefinition,
        cid: str,
        jevs: list[JourneyEvent],
        previous: datetime | None,
    ) -> _Start | None:
        """Decide on entry (trigger, re-entry rule) and write the enrollment before starting."""
        first = next((i for i, e in enumerate(jevs) if journey.entry.matches(e.as_context())), None)
        if first is None:
            return None
        rule = journey.re_entry
        if previous is not None:
            if rule.policy == "never":
                return None
            if rule.policy == "after" and rule.after is not None:
                if datetime.now(UTC) - previous < parse_duration(rule.after):
                    return None
        wid = workflow_id_for(journey.id, cid)
        enrollment = f"{wid}:{jevs[first].message_id}"
        status = await conn.fetchval(_ENROLL, enrollment, wid, journey.id, journey.version, cid)
        if status not in ("starting", "running"):
            return None  # this very entry already ran to its end
        return _Start(journey, cid, enrollment, jevs[first:])

    # -- Temporal calls ----------------------------------------------------------------
    async def _execute(self, plan: _Plan) -> None:
        calls: list[Any] = [self._start(s) for s in plan.starts]
        calls += [self._signal(s) for s in plan.signals]
        calls += [self._reassign(wid, cid) for wid, cid in plan.reassign]
        if calls:
            await asyncio.gather(*calls)

    async def _reassign(self, workflow_id: str, customer_id: str) -> None:
        async with self._sem:
            with contextlib.suppress(RPCError):
                await self.client.get_workflow_handle(workflow_id).signal("reassign", customer_id)

    async def _signal(self, sig: _Signal) -> None:
        try:
            async with self._sem:
                await self.client.get_workflow_handle(sig.workflow_id).signal("events", sig.events)
            return
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
        # The run has ended (finished just now, or was terminated by an operator): record
        # that, and enter again if these events trigger the journey.
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE journey_runs SET status = 'ended', ended_at = now() "
                "WHERE enrollment_id = $1 AND status IN ('starting', 'running')",
                sig.enrollment_id,
            )
            start = await self._enroll(conn, sig.journey, sig.customer_id, sig.events, None)
            if start is None:
                return
            await self._start(start)
            await conn.execute(
                "UPDATE journey_runs SET run_id = $2, status = 'running' "
                "WHERE enrollment_id = $1 AND status = 'starting'",
                start.enrollment_id,
                start.run_id,
            )

    async def _start(self, start: _Start) -> None:
        journey, cid = start.journey, start.customer_id
        wid = workflow_id_for(journey.id, cid)
        async with self._sem:
            handle = await self.client.start_workflow(
                "JourneyWorkflow",
                JourneyRunInput(
                    journey=journey,
                    customer_id=cid,
                    enrollment_id=start.enrollment_id,
                    history_limit=self.history_limit,
                ),
                id=wid,
                task_queue=self.task_queue,
                start_signal="events",
                start_signal_args=[start.events],
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                search_attributes=TypedSearchAttributes(
                    [
                        SearchAttributePair(CUSTOMER_ID, cid),
                        SearchAttributePair(JOURNEY_ID, journey.id),
                        SearchAttributePair(JOURNEY_VERSION, journey.version),
                        SearchAttributePair(JOURNEY_STEP, "(start)"),
                        SearchAttributePair(JOURNEY_STATUS, "running"),
                    ]
                ),
                memo={"journey": journey.name, "version": journey.version, "customer": cid},
                static_summary=f"{journey.name} v{journey.version} for customer {cid}",
            )
        start.run_id = handle.result_run_id
        log.info(
            "router.entered", customer_id=cid, journey_id=journey.id, workflow_id=wid,
            version=journey.version,
        )  # fmt: skip
