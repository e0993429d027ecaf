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

No event blocks the others. A chunk that fails with an error that says something about its
data (not an outage) is cut in halves and routed again, down to single events; an event that
still fails on its own, twice, is set aside in `dead_letters` with its error and everything
else flows. Which failures are the event's own:

- data errors: raised while reading or applying the event's payload (`UnroutableEvent`, e.g.
  an event too large for any signal, and the ValueError/TypeError/KeyError... family from
  code handling it), and a refusal by the one run the event is for
  (`enrollment.EventRejected`: a run past its signal limit), which other runs do not share;
- and only when the failure is not everyone's: an event is dead-lettered only if at least one
  other event of the same round routed fine. If every event of a round fails (a bug all
  events run into, a misconfigured server) the round fails with `SystemicRoutingError`:
  logged, retried with backoff, nothing set aside, and routing resumes by itself once fixed.

Not the event's fault, never dead-lettered:

- outages (database, Temporal unreachable, timeouts) and refusals of a start by the server
  (our inputs are bounded, so an INVALID_ARGUMENT there is the server's configuration, e.g. a
  search attribute missing): the round is retried with backoff;
- stored state this code cannot read (`RunStateUnusable`: a run's pinned definition or entry
  event that no longer validates). It is a fault of that journey or run, not of the events,
  and dead-lettering would set aside every event of those customers. Their events are held
  back (left in the outbox, in order), the others are routed, and the round ends with
  `RoutingHeld`: logged as an error and retried with backoff until the state or code is
  fixed.

Nothing in a chunk waits for a workflow to make progress: runs ended by a merge are told so in
the background, and `reconcile` (beside the sweep) repeats it and catches runs ended outside
our code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import structlog
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHistoryEventFilterType,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
    WorkflowUpdateStage,
)
from temporalio.service import RPCError, RPCStatusCode

from activities.enrollment import (
    RunStateUnusable,
    Start,
    enroll,
    load_history,
    load_refs,
    mark_started,
    refusal,
    rejected,
    run_key_of,
    slices,
    start_run,
)
from models.journey import EventMatch, JourneyDefinition
from models.loading import RUNTIME
from models.runtime import CustomerRefs, JourneyEvent, SteerCommand
from store.events import NOTIFY_CHANNEL, dead_letter
from store.journeys import (
    RoutedJourney,
    record_duplicate_closed,
    record_not_entered,
    record_run_abandoned,
    routed_journeys,
)
from store.profiles import StoredEvent, resolve_and_apply
from workflows.journey import JourneyWorkflow

log = structlog.stdlib.get_logger("router")

LEADER_LOCK = 7_270_001
CHUNK_LOCK = 7_270_002
SWEEP_SECONDS = 30.0
# How long telling a merged duplicate to exit may wait for the run to accept it. A healthy run
# accepts within one workflow task; one that cannot complete workflow tasks (non-determinism
# after a deploy) never does, and is asked again by the next `reconcile` pass.
EXIT_ACCEPT_SECONDS = 10.0
EXIT_CONCURRENCY = 4  # exits in flight at once: their own slots, never routing's
_SELECT = """
SELECT id, message_id, type, event, user_id, anonymous_id, previous_id, timestamp, payload
FROM events WHERE routed_at IS NULL ORDER BY timestamp, id LIMIT $1
"""
# Errors that come from an event's data and repeat whenever it is routed (and are only
# dead-lettered if other events route: see the module docstring). Anything else (the database
# or Temporal unreachable, a deadlock, a timeout, the server refusing a start) is retried,
# never dead-lettered.
_DATA_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    ValueError,  # pydantic's ValidationError, UnroutableEvent and EventRejected too
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)
_CLOSED_ABNORMALLY = {
    WorkflowExecutionStatus.TERMINATED: "terminated",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.TIMED_OUT: "timed out",
    WorkflowExecutionStatus.CANCELED: "canceled",
}


def _connection_lost(conn: asyncpg.Connection) -> bool:
    """Closed, or already taken back by the pool after its backend died (asyncpg then
    answers every call on the detached wrapper with InterfaceError)."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True


class SystemicRoutingError(RuntimeError):
    """Every event of a round failed with what looks like a data error: a fault of the
    system (a bug every event runs into, a misconfigured server), so nothing is set aside;
    the round is retried with backoff. The first error is the cause."""


class RoutingHeld(RuntimeError):
    """Some events were held back because stored state of their journey or run cannot be
    read (`RunStateUnusable`, the cause); the rest of the round was routed. Retried with
    backoff."""


def data_error(err: BaseException) -> bool:
    """True when `err` says something about the events routed, not about an outage."""
    return isinstance(err, _DATA_ERRORS)


@dataclass
class _Round:
    """What one round of bisection found: events routed, and the events that failed alone
    (set aside only if something else routed) or were held back."""

    routed: int = 0
    suspects: list[tuple[StoredEvent, BaseException]] = field(default_factory=list)
    held: list[tuple[StoredEvent, RunStateUnusable]] = field(default_factory=list)


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
    refs: list[tuple[str, CustomerRefs]] = field(default_factory=list)


async def _not_entered_while_paused(
    conn: asyncpg.Connection,
    journey: JourneyDefinition,
    customer_id: str,
    event: JourneyEvent,
    history: Any,
) -> None:
    """An entry event of a paused journey that would have entered it (no other rule refuses
    it) is recorded as not entered, never dropped without a trace."""
    if not journey.entry.matches(event.as_context()):
        return
    if refusal(journey, history, run_key_of(journey, event)) is not None:
        return
    await record_not_entered(conn, journey, customer_id, event.message_id, event.event, "paused")


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
        self._background: set[asyncio.Task[None]] = set()
        self._reconcile_after = ""  # enrollment id cursor: each pass takes the next page
        self._leader_pid: int | None = None
        self.exit_wait = EXIT_ACCEPT_SECONDS
        self._exit_slots = asyncio.Semaphore(EXIT_CONCURRENCY)
        self._exiting: set[str] = set()  # workflow ids with an exit in flight

    def journeys_changed(self) -> None:
        """Definitions or statuses changed: reload them before the next chunk is routed."""
        self._journeys_stale = True
        self._wake.set()

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

    @property
    def leader_pid(self) -> int | None:
        """The PostgreSQL backend pid of the connection holding leadership (None when this
        router is not the leader): what an operator or a test terminates to force a
        takeover."""
        return self._leader_pid

    async def _lead(self, stop: asyncio.Event) -> None:
        """Hold leadership on one connection, routing until `stop` or until the connection
        is lost (then return: `run` elects again at once).

        A backend that dies makes asyncpg hand the connection back to the pool and detach
        the wrapper we hold: every later call on it, `is_closed()` included, raises
        InterfaceError. So the loss is detected by a termination listener (and by that
        error), and the sweeper is stopped in `finally` whatever ends the leadership, or
        each re-election would start one more."""
        conn: asyncpg.Connection = await self.pool.acquire()
        lost = asyncio.Event()

        def on_lost(_: object) -> None:
            lost.set()
            self._wake.set()  # stop waiting for work: there is no leadership to route with

        conn.add_termination_listener(on_lost)
        sweeper: asyncio.Task[None] | None = None
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2.0)
                if stop.is_set():
                    return
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
            await conn.add_listener("journeys_changed", self._on_journeys)
            self._leader_pid = conn.get_server_pid()
            self._journeys_stale = True
            log.info("router.leader", pid=self._leader_pid)
            backoff = 0.2
            # The sweep of interrupted starts runs beside routing, never in its way.
            sweeper = asyncio.create_task(self._sweep(stop), name="router.sweep")
            while not stop.is_set():
                if lost.is_set() or _connection_lost(conn):
                    log.warning("router.leader_connection_lost")
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
            self._leader_pid = None
            if sweeper is not None:
                sweeper.cancel()
                await asyncio.wait([sweeper])  # ended before another leadership starts one
            if not lost.is_set() and not _connection_lost(conn):
                conn.remove_termination_listener(on_lost)
                # The pool's reset on release runs pg_advisory_unlock_all and UNLISTEN *; the
                # listeners are removed here so asyncpg does not warn about them. A connection
                # failing now is as good as released: its locks went with it.
                with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
                    await conn.remove_listener(NOTIFY_CHANNEL, self._on_notify)
                    await conn.remove_listener("journeys_changed", self._on_journeys)
            # A no-op for a connection asyncpg already took back after its backend died; a
            # reset that fails terminates the connection (asyncpg), which is what we want.
            with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
                await self.pool.release(conn)

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    def _on_journeys(self, *_: Any) -> None:
        self.journeys_changed()

    async def _sweep(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for task in (self.recover_stale_starts, self.reconcile):
                try:
                    await task()
                except Exception:
                    log.exception("router.sweep_error", task=task.__name__)
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
        refs = await load_refs(self.pool, list({r["customer_id"] for r in rows}))
        starts = [
            Start(
                JourneyDefinition.model_validate(r["definition"], context=RUNTIME),
                r["customer_id"],
                r["enrollment_id"],
                r["workflow_id"],
                [JourneyEvent.model_validate(r["entry"])],
                refs=refs.get(r["customer_id"], []),
            )
            for r in rows
        ]
        if starts:
            await asyncio.gather(*(self._start(s) for s in starts))
            await mark_started(self.pool, starts)
            log.info("router.recovered_starts", count=len(starts))
        return len(starts)

    async def reconcile(self, limit: int = 500) -> int:
        """Bring runs ended outside our code in line with Temporal; returns how many.

        Takes the next `limit` live rows (a cursor over passes, so every row is checked in
        turn however many there are) and describes each workflow id: a run whose workflow
        was terminated, failed, timed out or canceled is recorded as `exited` with that
        outcome, and its unsent messages as failed (`abandoned`). Runs a merge ended that are
        still running are told to exit again (the first attempt may have died with a worker),
        unless an exit is in flight already; once such a run has closed (or is gone) the row
        says so (`record_duplicate_closed`) and it is not checked again.
        """
        rows = await self.pool.fetch(
            "SELECT enrollment_id, workflow_id, status, customer_id FROM journey_runs "
            "WHERE enrollment_id > $1 AND (status IN ('starting', 'running') "
            "OR (status = 'exited' AND exit_reason = 'merged')) ORDER BY enrollment_id LIMIT $2",
            self._reconcile_after,
            limit,
        )
        self._reconcile_after = rows[-1]["enrollment_id"] if len(rows) == limit else ""
        done = await asyncio.gather(*(self._reconcile_run(dict(r)) for r in rows))
        if any(done):
            log.info("router.reconciled", runs=sum(done))
        return sum(done)

    async def _reconcile_run(self, row: dict[str, Any]) -> bool:
        handle = self.client.get_workflow_handle(row["workflow_id"])
        async with self._sem:
            try:
                desc = await handle.describe()
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
                # Not started yet (starting), or gone: nothing to compare. A merged
                # duplicate that is gone has nothing left to be told.
                if row["status"] == "exited":
                    await record_duplicate_closed(self.pool, row["enrollment_id"], "not found")
                return False
            if row["status"] == "exited":  # a duplicate ended by a merge
                if desc.status == WorkflowExecutionStatus.RUNNING:
                    # The row moved to the survivor with the merge.
                    self._exit_duplicate(row["workflow_id"], row["customer_id"])
                elif desc.status is not None:
                    await record_duplicate_closed(
                        self.pool, row["enrollment_id"], desc.status.name.lower().replace("_", " ")
                    )
                return False
            outcome = _CLOSED_ABNORMALLY.get(desc.status) if desc.status else None
            if outcome is None:
                return False
            # The id's latest execution may belong to an earlier enrollment (this one is
            # still starting): only this enrollment's own chain of runs counts.
            mine = row["enrollment_id"]
            if (await desc.memo()).get("enrollment", mine) != mine:
                return False
            reason = await self._close_reason(row["workflow_id"], desc.run_id)
        text = f"workflow {outcome}" + (f": {reason}" if reason else "")
        return await record_run_abandoned(self.pool, row["enrollment_id"], text)

    async def _close_reason(self, workflow_id: str, run_id: str | None) -> str | None:
        """Why the execution closed, from its close event (the termination reason, the
        failure message)."""
        handle = self.client.get_workflow_handle(workflow_id, run_id=run_id)
        async for event in handle.fetch_history_events(
            event_filter_type=WorkflowHistoryEventFilterType.CLOSE_EVENT
        ):
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
                return event.workflow_execution_terminated_event_attributes.reason or None
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
                return event.workflow_execution_failed_event_attributes.failure.message or None
        return None

    # -- one chunk -------------------------------------------------------------------
    async def route_once(self) -> int:
        if self._journeys_stale:
            # Cleared before the load so a change during it is not missed, and set again if
            # the load fails: routing with an old or empty list would mark events routed
            # that no journey saw.
            self._journeys_stale = False
            try:
                self._journeys = await routed_journeys(self.pool)
            except BaseException:
                self._journeys_stale = True
                raise
        async with self.pool.acquire() as conn:
            # Held for the whole chunk on this connection: if leadership was lost and another
            # router took over, this one routes nothing rather than the same chunk twice.
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", CHUNK_LOCK):
                return 0
            try:
                return await self._route_chunk(conn)
            finally:
                # A lost connection took the lock with it (and the pool's reset runs
                # pg_advisory_unlock_all): failing to unlock it must not hide the error that
                # ended the chunk.
                with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresConnectionError):
                    await conn.execute("SELECT pg_advisory_unlock($1)", CHUNK_LOCK)

    async def _route_chunk(self, conn: asyncpg.Connection) -> int:
        rows = await conn.fetch(_SELECT, self.batch_size)
        if not rows:
            return 0
        events: list[StoredEvent] = []
        for r in rows:
            try:
                events.append(StoredEvent(**dict(r)))
            except _DATA_ERRORS as err:
                await self._set_aside(conn, r["id"], r["message_id"], err, failures=1)
        if not events:
            return len(rows)
        rnd = _Round()
        await self._route_isolating(conn, events, rnd)
        if rnd.suspects:
            if rnd.routed == 0:
                first = rnd.suspects[0][1]
                log.error("router.systemic_failure", events=len(events), error=repr(first))
                raise SystemicRoutingError(
                    f"all {len(events)} events of the round failed: {first!r}"
                ) from first
            for e, err in rnd.suspects:
                await self._set_aside(conn, e.id, e.message_id, err, failures=2)
        if rnd.held:
            first_held = rnd.held[0][1]
            raise RoutingHeld(f"{len(rnd.held)} events held back: {first_held}") from first_held
        return len(rows)

    async def _route_isolating(
        self, conn: asyncpg.Connection, events: list[StoredEvent], rnd: _Round
    ) -> None:
        """Route these events; if their data makes that fail, halve them until the events
        that fail on their own are found (suspects, see `_route_chunk`). Events whose stored
        run state is unusable are held back the same way. Outages propagate."""
        try:
            await self._route_events(conn, events)
            rnd.routed += len(events)
            return
        except Exception as err:
            if not (data_error(err) or isinstance(err, RunStateUnusable)):
                raise
            log.warning("router.chunk_failed", events=len(events), error=repr(err))
        if len(events) > 1:
            half = len(events) // 2  # in order: earlier events are routed first
            await self._route_isolating(conn, events[:half], rnd)
            await self._route_isolating(conn, events[half:], rnd)
            return
        try:  # once more alone: only an error that repeats is the event's own
            await self._route_events(conn, events)
            rnd.routed += 1
        except RunStateUnusable as err:
            log.error(
                "router.run_state_unusable", event_id=events[0].id,
                customer_id=events[0].customer_id or None, error=str(err),
            )  # fmt: skip
            rnd.held.append((events[0], err))
        except Exception as err:
            if not data_error(err):
                raise
            rnd.suspects.append((events[0], err))

    async def _set_aside(
        self, conn: asyncpg.Connection, event_id: int, message_id: str, err: BaseException,
        *, failures: int,
    ) -> None:  # fmt: skip
        await dead_letter(conn, event_id, message_id, err, failures)
        log.error("router.dead_letter", event_id=event_id, message_id=message_id, error=repr(err))

    async def _route_events(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        async with conn.transaction():
            resolution = await resolve_and_apply(conn, events)
            plan = await self._plan(conn, events)
            plan.reassign = [(w, m.survivor) for m in resolution.merges for w in m.moved_running]
            plan.end_duplicates = [(w, m.survivor) for m in resolution.merges for w in m.duplicates]
            changed = resolution.identified | {m.survivor for m in resolution.merges}
            plan.refs = await self._refs_changed(conn, changed)
        await self._execute(plan)
        async with conn.transaction():
            await mark_started(conn, plan.starts)
            await conn.execute(
                "UPDATE events SET routed_at = now() WHERE id = ANY($1::bigint[])",
                [e.id for e in events],
            )
        log.debug("router.routed", events=len(events), starts=len(plan.starts))

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
                    refs = (await load_refs(conn, [cid])).get(cid, [])
                    plan.starts.append(
                        Start(
                            pinned, cid, r.enrollment_id, r.workflow_id, own + relevant, refs=refs
                        )
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
                    elif routed.status == "paused":
                        await _not_entered_while_paused(conn, journey, cid, event, history)
        return plan

    async def _refs_changed(
        self, conn: asyncpg.Connection, customers: set[str]
    ) -> list[tuple[str, CustomerRefs]]:
        """Running runs of customers whose identities changed in this chunk, with their refs
        now (only those: an event that adds no identity signals nothing)."""
        if not customers:
            return []
        rows = await conn.fetch(
            "SELECT workflow_id, customer_id FROM journey_runs "
            "WHERE customer_id = ANY($1::text[]) AND status = 'running'",
            list(customers),
        )
        refs = await load_refs(conn, list({r["customer_id"] for r in rows}))
        return [
            (r["workflow_id"], CustomerRefs(customer_id=r["customer_id"],
                                            refs=refs.get(r["customer_id"], [])))
            for r in rows
        ]  # fmt: skip

    # -- Temporal calls ----------------------------------------------------------------
    async def _execute(self, plan: _Plan) -> None:
        calls: list[Any] = [self._start(s) for s in plan.starts]
        calls += [self._signal(s) for s in plan.signals]
        calls += [self._reassign(wid, cid) for wid, cid in plan.reassign]
        calls += [self._send_refs(wid, refs) for wid, refs in plan.refs]
        # The merge is committed (the rows say `exited`); the runs are told in the background,
        # as an exit may wait for a step in flight (a send retrying while its provider is down)
        # and routing must not. `reconcile` repeats it for any that is still running.
        for wid, survivor in plan.end_duplicates:
            self._exit_duplicate(wid, survivor)
        # Every call runs to its end; then the first failure (if any) fails the chunk, which
        # is routed again (all of it is idempotent).
        failures = [r for r in await asyncio.gather(*calls, return_exceptions=True) if r]
        errors = [f for f in failures if isinstance(f, BaseException)]
        if errors:
            raise errors[0]

    def _in_background(self, call: Any) -> None:
        task = asyncio.create_task(call)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _exit_duplicate(self, workflow_id: str, survivor: str) -> None:
        """Tell a merged duplicate to exit, in the background, unless that is under way."""
        if workflow_id not in self._exiting:
            self._in_background(self._end_duplicate(workflow_id, survivor))

    async def _end_duplicate(self, workflow_id: str, survivor: str) -> None:
        """Tell a run a merge ended to exit. Waits only until the run has accepted the
        instruction (the run applies it between steps), never for the run to get there, and
        at most `exit_wait`: a run that cannot complete a workflow task never accepts, and
        `reconcile` asks again. Holds an exit slot, never a routing one. Never raises (a
        background task): failures are logged and left to `reconcile`."""
        if workflow_id in self._exiting:
            return
        self._exiting.add(workflow_id)
        cmd = SteerCommand(action="exit", reason=f"merged into {survivor}", by="router")
        handle = self.client.get_workflow_handle(workflow_id)
        wait = timedelta(seconds=self.exit_wait)
        try:
            async with self._exit_slots:
                await asyncio.wait_for(
                    handle.start_update(
                        JourneyWorkflow.steer,
                        cmd,
                        wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                        rpc_timeout=wait,
                    ),
                    # The SDK polls until accepted; this bounds the whole wait.
                    timeout=self.exit_wait + 1.0,
                )
        except WorkflowUpdateFailedError as err:
            # Rejected: it has ended, or an instruction (an exit) is being applied already.
            log.info("router.duplicate_not_steered", workflow_id=workflow_id, error=str(err))
        except (WorkflowUpdateRPCTimeoutOrCancelledError, TimeoutError):
            log.warning(
                "router.duplicate_exit_not_accepted", workflow_id=workflow_id,
                waited=self.exit_wait,
            )  # fmt: skip
        except RPCError as err:
            # Gone (NOT_FOUND) is the end we want; anything else is retried by `reconcile`.
            log.info("router.duplicate_not_steered", workflow_id=workflow_id, error=str(err))
        except Exception:
            log.exception("router.duplicate_exit_failed", workflow_id=workflow_id)
        finally:
            self._exiting.discard(workflow_id)

    async def _reassign(self, workflow_id: str, customer_id: str) -> None:
        async with self._sem:
            with contextlib.suppress(RPCError):
                await self.client.get_workflow_handle(workflow_id).signal(
                    JourneyWorkflow.reassign, customer_id
                )

    async def _send_refs(self, workflow_id: str, refs: CustomerRefs) -> None:
        """Tell a run its customer's identities (CustomerRefs); a run that has ended is fine."""
        async with self._sem:
            with contextlib.suppress(RPCError):
                await self.client.get_workflow_handle(workflow_id).signal(
                    JourneyWorkflow.refs, refs
                )

    async def _version(self, current: JourneyDefinition, version: int) -> JourneyDefinition:
        """The definition a run is pinned to (usually the current one).

        Raises:
            RunStateUnusable: the pinned version no longer validates (a fault of that
                journey, never of the event being routed).
        """
        if version in (0, current.version):
            return current
        data = await self.pool.fetchval(
            "SELECT definition FROM journey_versions WHERE journey_id = $1 AND version = $2",
            current.id,
            version,
        )
        try:
            return JourneyDefinition.model_validate(data, context=RUNTIME) if data else current
        except ValueError as err:
            raise RunStateUnusable(f"journey {current.id} v{version}: {err}") from err

    async def _signal(self, sig: _Signal) -> None:
        handle = self.client.get_workflow_handle(sig.workflow_id)
        try:
            for part in slices(sig.events):
                async with self._sem:
                    await handle.signal(JourneyWorkflow.events, part)
            return
        except RPCError as err:
            if err.status == RPCStatusCode.INVALID_ARGUMENT:
                # This run refuses these events (past its signal limit, over the payload
                # limit): raised as the events' fault, so bisection sets the one that is
                # refused aside with the reason; never skipped silently as routed.
                log.error("router.signal_rejected", workflow_id=sig.workflow_id, error=str(err))
                raise rejected(sig.workflow_id, err) from err
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
