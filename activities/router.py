"""The outbox router: stored events → identity + profile → journey signals.

The API only commits events to PostgreSQL (durable once it answers 200). This loop, running in
the worker process, picks up unrouted events in timestamp order, resolves each to a customer,
applies traits, and signals the customer's journeys (signal-with-start for an entry trigger)
inside one database transaction per chunk. If anything fails (Temporal down, Postgres down,
process killed) the transaction rolls back and the chunk is routed again; signals that did go
out are delivered twice and the workflow drops them by `messageId`. One router is active at a
time (advisory lock), which keeps a customer's events in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
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
from store.profiles import Resolution, StoredEvent, resolve_and_apply
from workflows.journey import workflow_id_for

log = structlog.stdlib.get_logger("router")

LEADER_LOCK = 7_270_001
_SELECT = """
SELECT id, message_id, type, event, user_id, anonymous_id, previous_id, timestamp, payload
FROM events WHERE routed_at IS NULL ORDER BY timestamp, id LIMIT $1 FOR UPDATE SKIP LOCKED
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
        """Become leader, then route until `stop` is set; back off on errors."""
        conn: asyncpg.Connection = await self.pool.acquire()
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2.0)
                if stop.is_set():
                    return
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
            await conn.add_listener("journeys_changed", self._on_journeys)
            log.info("router.leader")
            backoff = 0.2
            while not stop.is_set():
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
            with contextlib.suppress(Exception):
                await conn.execute("SELECT pg_advisory_unlock_all()")
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
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_SELECT, self.batch_size)
            if not rows:
                return 0
            events = [StoredEvent(**dict(r)) for r in rows]
            resolution = await resolve_and_apply(conn, events)
            await self._dispatch(conn, events, resolution)
            await conn.execute(
                "UPDATE events SET routed_at = now() WHERE id = ANY($1::bigint[])",
                [e.id for e in events],
            )
        log.debug("router.routed", events=len(events))
        return len(events)

    async def _dispatch(
        self, conn: asyncpg.Connection, events: list[StoredEvent], res: Resolution
    ) -> None:
        by_customer: dict[str, list[JourneyEvent]] = defaultdict(list)
        for e in events:
            by_customer[e.customer_id].append(journey_event(e))
        calls: list[Any] = [
            self._signal(wid, "reassign", m.survivor) for m in res.merges for wid in m.moved_running
        ]
        if self._journeys:
            cids = list(by_customer)
            active: dict[tuple[str, str], list[str]] = defaultdict(list)
            last: dict[tuple[str, str], datetime] = {}
            for r in await conn.fetch(
                "SELECT customer_id, journey_id, workflow_id, status, started_at FROM journey_runs "
                "WHERE customer_id = ANY($1::text[])",
                cids,
            ):
                key = (r["customer_id"], r["journey_id"])
                if r["status"] == "running":
                    active[key].append(r["workflow_id"])
                if key not in last or r["started_at"] > last[key]:
                    last[key] = r["started_at"]
            for journey in self._journeys:
                entry_keys = _names([journey.entry])
                keys = entry_keys | _names(journey.interesting())
                for cid, jevs in by_customer.items():
                    relevant = [e for e in jevs if _hits(keys, e)]
                    if not relevant:
                        continue
                    runs = active.get((cid, journey.id))
                    if runs:
                        calls.extend(
                            self._signal_or_enter(wid, journey, cid, relevant, last)
                            for wid in dict.fromkeys(runs)
                        )
                    else:
                        calls.append(self._enter(journey, cid, relevant, last))
        if not calls:
            return
        started = [r for r in await asyncio.gather(*calls) if isinstance(r, tuple)]
        if started:
            # A finished run we signalled in vain is marked done before its successor starts.
            await conn.executemany(
                "UPDATE journey_runs SET status = 'completed', ended_at = now() "
                "WHERE workflow_id = $1 AND status = 'running' AND run_id <> $2",
                [(r[1], r[0]) for r in started],
            )
            await conn.executemany(
                "INSERT INTO journey_runs (run_id, workflow_id, journey_id, journey_version, "
                "customer_id, status) VALUES ($1, $2, $3, $4, $5, 'running') "
                "ON CONFLICT DO NOTHING",
                started,
            )

    # -- Temporal calls ----------------------------------------------------------------
    async def _signal(self, workflow_id: str, signal: str, arg: Any) -> bool:
        """Signal a run; False when it has already finished."""
        async with self._sem:
            try:
                await self.client.get_workflow_handle(workflow_id).signal(signal, arg)
                return True
            except RPCError as err:
                if err.status == RPCStatusCode.NOT_FOUND:
                    return False
                raise

    async def _signal_or_enter(
        self,
        workflow_id: str,
        journey: JourneyDefinition,
        cid: str,
        jevs: list[JourneyEvent],
        last: dict[tuple[str, str], datetime],
    ) -> tuple[str, str, str, int, str] | None:
        if await self._signal(workflow_id, "events", jevs):
            return None
        # The run finished after we looked (its end is being recorded): re-enter if allowed.
        return await self._enter(journey, cid, jevs, last)

    async def _enter(
        self,
        journey: JourneyDefinition,
        cid: str,
        jevs: list[JourneyEvent],
        last: dict[tuple[str, str], datetime],
    ) -> tuple[str, str, str, int, str] | None:
        """Signal-with-start a run; returns its journey_runs row, or None if not entered."""
        start = next((i for i, e in enumerate(jevs) if journey.entry.matches(e.as_context())), None)
        if start is None:
            return None
        previous = last.get((cid, journey.id))
        rule = journey.re_entry
        if previous is not None:
            if rule.policy == "never":
                return None
            if rule.policy == "after" and rule.after is not None:
                if datetime.now(UTC) - previous < parse_duration(rule.after):
                    return None
        wid = workflow_id_for(journey.id, cid)
        async with self._sem:
            handle = await self.client.start_workflow(
                "JourneyWorkflow",
                JourneyRunInput(journey=journey, customer_id=cid, history_limit=self.history_limit),
                id=wid,
                task_queue=self.task_queue,
                start_signal="events",
                start_signal_args=[jevs[start:]],
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
        log.info(
            "router.entered", customer_id=cid, journey_id=journey.id, workflow_id=wid,
            version=journey.version,
        )  # fmt: skip
        assert handle.result_run_id is not None
        return (handle.result_run_id, wid, journey.id, journey.version, cid)
