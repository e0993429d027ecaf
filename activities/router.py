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
from typing import Any

import asyncpg
import structlog
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from activities.enrollment import (
    Start,
    enroll,
    load_history,
    mark_started,
    slices,
    start_run,
)
from models.journey import EventMatch, JourneyDefinition
from models.runtime import JourneyEvent, SteerCommand
from store.events import NOTIFY_CHANNEL
from store.journeys import RoutedJourney, routed_journeys
from store.profiles import StoredEvent, resolve_and_apply

log = structlog.stdlib.get_logger("router")

LEADER_LOCK = 7_270_001
CHUNK_LOCK = 7_270_002
SWEEP_SECONDS = 30.0
_SELECT = """
SELECT id, message_id, type, event, user_id, anonymous_id, previous_id, timestamp, payload
FROM events WHERE routed_at IS NULL ORDER BY timestamp, id LIMIT $1
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
class _Signal:
    workflow_id: str
    enrollment_id: str
    journey: JourneyDefinition
    customer_id: str
    events: list[JourneyEvent]
    open: bool = True


@dataclass
class _Plan:
    signals: list[_Signal] = field(default_factory=list)
    starts: list[Start] = field(default_factory=list)
    reassign: list[tuple[str, str]] = field(default_factory=list)
    end_duplicates: list[tuple[str, str]] = field(default_factory=list)


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
        self._journeys: list[RoutedJourney] = []
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
            # The sweep of interrupted starts runs beside routing, never in its way.
            sweeper = asyncio.create_task(self._sweep(stop))
            while not stop.is_set():
                if conn.is_closed():
                    sweeper.cancel()
                    return  # lost the lock with the connection: become leader again
                # Cleared before routing: a NOTIFY during this round wakes the next one.
                self._wake.clear()
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

    async def _sweep(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.recover_stale_starts()
            except Exception:
                log.exception("router.sweep_error")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SWEEP_SECONDS)

    async def recover_stale_starts(self, older_than: float = SWEEP_SECONDS) -> int:
        """Start enrollments left `starting` by a crash (router or enroll API) with no event
        since to carry them; the row holds the entry event and the pinned version."""
        rows = await self.pool.fetch(
            "SELECT r.enrollment_id, r.workflow_id, r.customer_id, r.entry, v.definition "
            "FROM journey_runs r JOIN journey_versions v "
            "ON v.journey_id = r.journey_id AND v.version = r.journey_version "
            "WHERE r.status = 'starting' AND r.entry IS NOT NULL "
            "AND r.started_at < now() - make_interval(secs => $1) ORDER BY r.started_at LIMIT 500",
            older_than,
        )
        starts = [
            Start(
                JourneyDefinition.model_validate(r["definition"]),
                r["customer_id"],
                r["enrollment_id"],
                r["workflow_id"],
                [JourneyEvent.model_validate(r["entry"])],
            )
            for r in rows
        ]
        if starts:
            await asyncio.gather(*(self._start(s) for s in starts))
            await mark_started(self.pool, starts)
            log.info("router.recovered_starts", count=len(starts))
        return len(starts)

    # -- one chunk -------------------------------------------------------------------
    async def route_once(self) -> int:
        if self._journeys_stale:
            self._journeys_stale = False
            self._journeys = await routed_journeys(self.pool)
        async with self.pool.acquire() as conn:
            # Held for the whole chunk on this connection: if leadership was lost and another
            # router took over, this one routes nothing rather than the same chunk twice.
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", CHUNK_LOCK):
                return 0
            try:
                return await self._route_chunk(conn)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", CHUNK_LOCK)

    async def _route_chunk(self, conn: asyncpg.Connection) -> int:
        async with conn.transaction():
            rows = await conn.fetch(_SELECT, self.batch_size)
            if not rows:
                return 0
            events = [StoredEvent(**dict(r)) for r in rows]
            resolution = await resolve_and_apply(conn, events)
            plan = await self._plan(conn, events)
            plan.reassign = [(w, m.survivor) for m in resolution.merges for w in m.moved_running]
            plan.end_duplicates = [(w, m.survivor) for m in resolution.merges for w in m.duplicates]
        await self._execute(plan)
        async with conn.transaction():
            await mark_started(conn, plan.starts)
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
        histories = await load_history(conn, list(by_customer))
        for routed in self._journeys:
            journey, keys = routed.current, routed.keys
            for cid, jevs in by_customer.items():
                relevant = [e for e in jevs if _hits(keys, e)]
                if not relevant:
                    continue
                history = histories[(cid, journey.id)]
                # Written, but the router stopped before recording the start: start again
                # (signal-with-start joins the run if it did start).
                for r in history.starting:
                    pinned = await self._version(journey, r.version)
                    own = [r.entry] if r.entry and r.entry not in relevant else []
                    plan.starts.append(
                        Start(pinned, cid, r.enrollment_id, r.workflow_id, own + relevant)
                    )
                # A running run gets this customer's entries only along with an event it
                # reacts to (an entry after its exit is then handed back by the run).
                if any(_hits(routed.interest, e) for e in relevant):
                    plan.signals.extend(
                        _Signal(r.workflow_id, r.enrollment_id, journey, cid, relevant, routed.open)
                        for r in history.running
                    )
                for i, event in enumerate(relevant):
                    if routed.open and journey.entry.matches(event.as_context()):
                        start = await enroll(conn, journey, cid, event, relevant[i:], history)
                        if isinstance(start, Start):
                            plan.starts.append(start)
        return plan

    # -- Temporal calls ----------------------------------------------------------------
    async def _execute(self, plan: _Plan) -> None:
        calls: list[Any] = [self._start(s) for s in plan.starts]
        calls += [self._signal(s) for s in plan.signals]
        calls += [self._reassign(wid, cid) for wid, cid in plan.reassign]
        calls += [self._end_duplicate(wid, cid) for wid, cid in plan.end_duplicates]
        # Every call runs to its end; then the first failure (if any) fails the chunk, which
        # is routed again (all of it is idempotent).
        failures = [r for r in await asyncio.gather(*calls, return_exceptions=True) if r]
        errors = [f for f in failures if isinstance(f, BaseException)]
        if errors:
            raise errors[0]

    async def _end_duplicate(self, workflow_id: str, survivor: str) -> None:
        cmd = SteerCommand(action="exit", reason=f"merged into {survivor}", by="router")
        async with self._sem:
            with contextlib.suppress(RPCError, WorkflowUpdateFailedError):
                await self.client.get_workflow_handle(workflow_id).execute_update("steer", cmd)

    async def _reassign(self, workflow_id: str, customer_id: str) -> None:
        async with self._sem:
            with contextlib.suppress(RPCError):
                await self.client.get_workflow_handle(workflow_id).signal("reassign", customer_id)

    async def _version(self, current: JourneyDefinition, version: int) -> JourneyDefinition:
        """The definition a run is pinned to (usually the current one)."""
        if version in (0, current.version):
            return current
        data = await self.pool.fetchval(
            "SELECT definition FROM journey_versions WHERE journey_id = $1 AND version = $2",
            current.id,
            version,
        )
        return JourneyDefinition.model_validate(data) if data else current

    async def _signal(self, sig: _Signal) -> None:
        handle = self.client.get_workflow_handle(sig.workflow_id)
        try:
            for part in slices(sig.events):
                async with self._sem:
                    await handle.signal("events", part)
            return
        except RPCError as err:
            if err.status == RPCStatusCode.INVALID_ARGUMENT:
                # Not retryable (e.g. over a server limit): skip it rather than block routing.
                log.error("router.signal_rejected", workflow_id=sig.workflow_id, error=str(err))
                return
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
        # The run has ended (finished just now, or was terminated by an operator): record
        # that, and enter again if these events trigger the journey. The enrollment is
        # committed before Temporal is called, as in route_once.
        starts: list[Start] = []
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute(
                    "UPDATE journey_runs SET status = 'ended', ended_at = now() "
                    "WHERE enrollment_id = $1 AND status IN ('starting', 'running')",
                    sig.enrollment_id,
                )
                history = (await load_history(conn, [sig.customer_id]))[
                    (sig.customer_id, sig.journey.id)
                ]
                for i, event in enumerate(sig.events):
                    if sig.open and sig.journey.entry.matches(event.as_context()):
                        start = await enroll(
                            conn, sig.journey, sig.customer_id, event, sig.events[i:], history
                        )
                        if isinstance(start, Start):
                            starts.append(start)
            for start in starts:
                await self._start(start)
            await mark_started(conn, starts)

    async def _start(self, start: Start) -> None:
        async with self._sem:
            await start_run(self.client, self.task_queue, self.history_limit, start)
