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
else flows. A round spends at most `ROUND_ATTEMPTS` route attempts on halving: a chunk that
still fails after that is not halved further, its events wait as suspects (below), so a
full batch of bad events costs a round a few hundred attempts, not thousands. Which failures
are the event's own:

- data errors: raised while reading or applying the event's payload (`UnroutableEvent`, e.g.
  an event too large for any signal, and the ValueError/TypeError/KeyError... family from
  code handling it), and a refusal by the one run the event is for
  (`enrollment.EventRejected`: a run past its signal limit), which other runs do not share;
- and only when the failure is not everyone's: an event is dead-lettered only if at least one
  other event routed fine, in the same round or since the event (or its customer) was first
  held back. If every event of a round fails (a bug all events run into, a misconfigured
  server) the round fails with `SystemicRoutingError`: logged, nothing set aside, its events
  held back as suspects (below), and routing resumes by itself once fixed. The one exception
  is a lone suspect (the suspects remembered are all of one customer, and nothing else
  routes to compare them with): it is dead-lettered once it has failed alone
  `LONE_FAILURES` times over at least `LONE_SPAN` seconds. A system fault that only one
  customer's events in a quiet system run into is then set aside too (replay them from
  `dead_letters` after the fix); suspects of two or more customers wait for any other event
  to route.

Not the event's fault, never dead-lettered:

- outages (database, Temporal unreachable, timeouts) and refusals of a start by the server
  (our inputs are bounded, so an INVALID_ARGUMENT there is the server's configuration, e.g. a
  search attribute missing): the round is retried with backoff;
- stored state this code cannot read (`RunStateUnusable`: a run's pinned definition or entry
  event that no longer validates). It is a fault of that journey or run, not of the events,
  and dead-lettering would set aside every event of those customers. Their events are held
  back (left in the outbox, in order), the others are routed, and the round ends with
  `RoutingHeld`: logged as an error, and retried (below) until the state or code is fixed.
  A journey whose current version cannot be read (`RoutedJourney.unreadable`) holds back
  the events that hit it the same way, rather than routing them past it.

Held back, not blocking (`_Holds`, in memory, at most `HOLD_LIMIT` events): a held event and a
suspect (failed with nothing else routing, or left when a round's attempts ran out) hold back
their CUSTOMER, by every user and anonymous id it has, so its later events wait behind it and
its order is kept. The main rounds leave held customers out of their select, so they neither
slow nor stop the others, and a hold is no reason for the leader loop to back off.
`retry_holds` routes them on their own, slower timer (`HOLD_RETRY` seconds, doubled after each
retry up to `HOLD_RETRY_MAX`; at once after a journey change): a held customer whose events
route is released, a suspect that fails alone again is dead-lettered under the rules above.
A restart forgets the holds: their events are simply routed (and held) again. Beyond
`HOLD_LIMIT`, failing events are not remembered and are retried by the main rounds with
backoff, as before. The leader loop's backoff after a failed round ends early on a NOTIFY.

Nothing in a chunk waits for a workflow to make progress: runs ended by a merge are told so in
the background, and `reconcile` (beside the sweep) repeats it and catches runs ended outside
our code.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
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
from store.events import (
    NOTIFY_CHANNEL,
    Held,
    customer_identities,
    dead_letter,
    select_held,
    select_unrouted,
)
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
# Held and suspect events (see the module docstring) wait on their own timer.
HOLD_LIMIT = 10_000  # failing events remembered at most; beyond, rounds retry them with backoff
HOLD_RETRY = 5.0  # seconds to a hold's first retry; doubled after each retry, up to:
HOLD_RETRY_MAX = 30.0
LONE_FAILURES = 3  # a lone suspect is dead-lettered after failing alone this often ...
LONE_SPAN = 60.0  # ... over at least this many seconds
ROUND_ATTEMPTS = 256  # route attempts a round may take halving before the rest waits
RETRY_ATTEMPTS = 256  # route attempts one retry of held and suspect events may take
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


def _own_keys(e: StoredEvent) -> tuple[set[str], set[str]]:
    """The user and anonymous ids an event names (a previous id may be either)."""
    users = {v for v in (e.user_id, e.previous_id) if v}
    anons = {v for v in (e.anonymous_id, e.previous_id) if v}
    return users, anons


def _names_any(e: StoredEvent, users: set[str], anons: set[str]) -> bool:
    """Whether the event names one of these ids (as `store.events.select_held` matches)."""
    return (
        e.user_id in users
        or e.anonymous_id in anons
        or (e.previous_id is not None and (e.previous_id in users or e.previous_id in anons))
    )


@dataclass
class _Round:
    """What one round of bisection found: events routed, the events that failed alone (set
    aside only under the rules of the module docstring), were held back, or were left
    untried when the round's `budget` of route attempts ran out (`unresolved`); and the
    later events of customers held back in this round (`skipped`, by `users` / `anons`)."""

    budget: int
    attempts: int = 0
    routed: int = 0
    suspects: list[tuple[StoredEvent, BaseException]] = field(default_factory=list)
    held: list[tuple[StoredEvent, RunStateUnusable]] = field(default_factory=list)
    unresolved: list[tuple[StoredEvent, BaseException]] = field(default_factory=list)
    skipped: list[StoredEvent] = field(default_factory=list)
    users: set[str] = field(default_factory=set)
    anons: set[str] = field(default_factory=set)


@dataclass
class _Failure:
    """A held or suspect event the router remembers: how often it failed on its own, since
    when (`first`, monotonic), and how many events the router had routed then (`seq`)."""

    event_id: int
    message_id: str
    error: BaseException
    held: bool
    first: float
    seq: int
    failures: int = 0
    backoff: float = HOLD_RETRY


@dataclass(eq=False)
class _Hold:
    """One customer held back: its failing events, and every user / anonymous id it has (so
    its later events wait too: its order is kept). Retried at `due` (monotonic); held since
    `first` (monotonic), when the router had routed `seq` events."""

    users: set[str]
    anons: set[str]
    failures: dict[int, _Failure]
    due: float
    first: float
    seq: int

    @property
    def backoff(self) -> float:
        return max((f.backoff for f in self.failures.values()), default=HOLD_RETRY)


class _Holds:
    """The holds, in memory (a restart forgets them: the events are routed again, and fail
    again, as if new), at most `limit` failing events; holds that share an id are one."""

    def __init__(self, limit: int = HOLD_LIMIT) -> None:
        self.limit = limit
        self.size = 0
        self._holds: set[_Hold] = set()
        self._by_user: dict[str, _Hold] = {}
        self._by_anon: dict[str, _Hold] = {}
        self._by_id: dict[int, _Hold] = {}

    def __len__(self) -> int:
        return self.size

    @property
    def room(self) -> bool:
        return self.size < self.limit

    def with_suspects(self) -> int:
        """How many held customers have a suspect event."""
        return sum(any(not f.held for f in h.failures.values()) for h in self._holds)

    def held(self, holds: list[_Hold] | None = None) -> Held:
        """What the outbox queries match (all holds, or these)."""
        if holds is None:
            return Held(list(self._by_id), list(self._by_user), list(self._by_anon))
        return Held(
            [i for h in holds for i in h.failures],
            list({u for h in holds for u in h.users}),
            list({a for h in holds for a in h.anons}),
        )

    def of(self, e: StoredEvent) -> list[_Hold]:
        users, anons = _own_keys(e)
        found = {self._by_id.get(e.id)}
        found |= {self._by_user.get(u) for u in users} | {self._by_anon.get(a) for a in anons}
        return [h for h in found if h is not None]

    def put(self, hold: _Hold) -> bool:
        """Add a hold, merged with any it shares an id with; False if there is no room."""
        if self.size + len(hold.failures) > self.limit:
            return False
        others = {self._by_user.get(u) for u in hold.users}
        others |= {self._by_anon.get(a) for a in hold.anons}
        others |= {self._by_id.get(i) for i in hold.failures}
        for other in others - {None, hold}:
            assert other is not None
            self.take(other)
            hold.users |= other.users
            hold.anons |= other.anons
            hold.failures = {**other.failures, **hold.failures}
            hold.due = min(hold.due, other.due)
            hold.first = min(hold.first, other.first)
            hold.seq = min(hold.seq, other.seq)
        self._holds.add(hold)
        self.size += len(hold.failures)
        self._by_user.update(dict.fromkeys(hold.users, hold))
        self._by_anon.update(dict.fromkeys(hold.anons, hold))
        self._by_id.update(dict.fromkeys(hold.failures, hold))
        return True

    def take(self, hold: _Hold) -> None:
        """Remove a hold (to retry it, or because it is released)."""
        if hold not in self._holds:
            return
        self._holds.discard(hold)
        self.size -= len(hold.failures)
        for index, keys in (
            (self._by_user, hold.users),
            (self._by_anon, hold.anons),
            (self._by_id, hold.failures),
        ):
            for k in keys:
                if index.get(k) is hold:  # type: ignore[call-overload]
                    del index[k]  # type: ignore[arg-type]

    def due(self, now: float | None) -> list[_Hold]:
        """Holds whose retry is due (all of them when `now` is None), the longest due first."""
        return sorted((h for h in self._holds if now is None or h.due <= now), key=lambda h: h.due)

    def next_due(self) -> float | None:
        return min((h.due for h in self._holds), default=None)


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
        self._holds = _Holds()
        self._routed_seq = 0  # events routed so far (whether a suspect's fault is its own)
        # Tunable (tests shorten them): see the constants of the same names.
        self.hold_retry = HOLD_RETRY
        self.hold_retry_max = HOLD_RETRY_MAX
        self.lone_span = LONE_SPAN
        self.backoffs = 0  # how often the leader loop backed off after a failed round

    def journeys_changed(self) -> None:
        """Definitions or statuses changed: reload them before the next chunk is routed, and
        retry held events at once (the change may be the fix)."""
        self._journeys_stale = True
        for hold in self._holds.due(None):
            hold.due = 0.0
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
                failed = False
                try:
                    n = await self.route_once()
                except RoutingHeld as err:
                    # Logged as an error (its events are not routed), but no reason to wait:
                    # the held customers are left out of the next rounds, unless there was
                    # no room to remember them.
                    log.error("router.routing_held", error=str(err), holds=len(self._holds))
                    n, failed = self.batch_size, not self._holds.room
                except Exception:
                    log.exception("router.error", retry_in=backoff)
                    n, failed = 0, True
                if not failed:
                    try:
                        await self.retry_holds()
                    except Exception:
                        log.exception("router.retry_error", retry_in=backoff)
                        failed = True
                if failed:
                    await self._back_off(stop, backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                backoff = 0.2
                if n >= self.batch_size:
                    continue
                due = self._holds.next_due()
                wait = 1.0 if due is None else min(1.0, due - time.monotonic())
                if wait > 0:
                    # NOTIFY wakes us at once; the timeout is a safety net for a lost
                    # notification, or the next retry of held and suspect events.
                    await self._idle(stop, wait)
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

    async def _idle(self, stop: asyncio.Event, seconds: float) -> None:
        """Wait for a NOTIFY (new events, changed journeys), `stop`, or `seconds`."""
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _back_off(self, stop: asyncio.Event, backoff: float) -> None:
        """After a failed round: wait `backoff`, but new events (NOTIFY) end the wait, as
        they may well route (the failed round's events are left out if they were held)."""
        self.backoffs += 1
        self._wake.clear()
        await self._idle(stop, backoff)

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
    async def _load_journeys(self) -> None:
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

    async def route_once(self) -> int:
        """Route the next chunk of unrouted events, leaving out held customers and suspect
        events (`retry_holds` routes those). Returns how many events were taken.

        Raises:
            RoutingHeld: events were held back in this round (the others were routed).
            SystemicRoutingError: every event of the round failed (remembered as suspects
                when there is room, and left out of the next rounds).
        """
        await self._load_journeys()
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

    async def retry_holds(self, *, every: bool = False) -> int:
        """Route the events of held customers and suspect events whose retry is due (all of
        them with `every`), on their own: dead-letters a suspect that fails alone again when
        the module docstring's rules say it is its own fault, holds the rest again with a
        longer wait. At most `RETRY_ATTEMPTS` route attempts (the holds left are still due).
        Returns how many events were routed or set aside."""
        due = self._holds.due(None if every else time.monotonic())
        if not due:
            return 0
        await self._load_journeys()
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", CHUNK_LOCK):
                return 0
            try:
                return await self._retry(conn, due)
            finally:
                with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresConnectionError):
                    await conn.execute("SELECT pg_advisory_unlock($1)", CHUNK_LOCK)

    async def _stored(
        self, conn: asyncpg.Connection, rows: list[asyncpg.Record]
    ) -> list[StoredEvent]:
        events: list[StoredEvent] = []
        for r in rows:
            try:
                events.append(StoredEvent(**dict(r)))
            except _DATA_ERRORS as err:
                await self._set_aside(conn, r["id"], r["message_id"], err, failures=1)
        return events

    async def _route_chunk(self, conn: asyncpg.Connection) -> int:
        rows = await select_unrouted(conn, self.batch_size, self._holds.held())
        if not rows:
            return 0
        events = await self._stored(conn, rows)
        if not events:
            return len(rows)
        rnd = _Round(budget=ROUND_ATTEMPTS)
        await self._route_isolating(conn, events, rnd)
        await self._settle(conn, rnd, {})
        failed = rnd.suspects + rnd.unresolved
        if failed and rnd.routed == 0:
            first = failed[0][1]
            log.error("router.systemic_failure", events=len(events), error=repr(first))
            raise SystemicRoutingError(
                f"all {len(events)} events of the round failed: {first!r}"
            ) from first
        if rnd.held:
            first_held = rnd.held[0][1]
            raise RoutingHeld(f"{len(rnd.held)} events held back: {first_held}") from first_held
        return len(rows)

    async def _retry(self, conn: asyncpg.Connection, due: list[_Hold]) -> int:
        rows = await select_held(conn, self.batch_size, self._holds.held(due))
        full = len(rows) >= self.batch_size
        events = await self._stored(conn, rows)
        dead = len(rows) - len(events)
        groups: dict[_Hold, list[StoredEvent]] = {}
        for e in events:
            holds = self._holds.of(e)
            if len(holds) > 1:  # the event links customers held apart: one hold now
                merged = holds[0]
                for h in holds:
                    self._holds.take(h)
                for h in holds[1:]:
                    merged.users |= h.users
                    merged.anons |= h.anons
                    merged.failures.update(h.failures)
                    merged.due = min(merged.due, h.due)
                    merged.first = min(merged.first, h.first)
                    merged.seq = min(merged.seq, h.seq)
                    groups[merged] = groups.get(merged, []) + groups.pop(h, [])
                groups[merged] = sorted(groups.get(merged, []), key=lambda x: (x.timestamp, x.id))
                self._holds.put(merged)
                holds = [merged]
            if holds:
                groups.setdefault(holds[0], []).append(e)
        rnd = _Round(budget=RETRY_ATTEMPTS)
        taken: list[_Hold] = []
        previous: dict[int, _Failure] = {}
        try:
            for hold, group in groups.items():
                if rnd.attempts >= rnd.budget:
                    break  # the rest stays due: the leader loop comes back at once
                self._holds.take(hold)
                taken.append(hold)
                previous.update(hold.failures)
                for e in group:  # a later event failing now was held as long as its customer
                    previous.setdefault(
                        e.id,
                        _Failure(e.id, e.message_id, RuntimeError("held"), held=True,
                                 first=hold.first, seq=hold.seq, backoff=hold.backoff),
                    )  # fmt: skip
                await self._route_isolating(conn, group, rnd)
            if not full:  # nothing of theirs is left unrouted: released
                for hold in due:
                    if hold not in groups:
                        self._holds.take(hold)
        except BaseException:
            for hold in taken:  # as they were: retried again after the outage
                self._holds.put(hold)
            raise
        dead += await self._settle(conn, rnd, previous)
        if full:
            # Their events past the limit were not tried: a customer all of whose tried
            # events were routed or set aside stays held (the rest keeps its order, and
            # counts as held since then), and is retried at once.
            now = time.monotonic()
            for hold in taken:
                if not any(self._holds.of(e) for e in groups[hold]):
                    self._holds.put(_Hold(hold.users, hold.anons, {}, now, hold.first, hold.seq))
        log.info(
            "router.holds_retried", holds=len(taken), routed=rnd.routed, dead_lettered=dead,
            still_held=len(self._holds),
        )  # fmt: skip
        return rnd.routed + dead

    async def _settle(
        self, conn: asyncpg.Connection, rnd: _Round, previous: dict[int, _Failure]
    ) -> int:
        """After a round: set aside the suspects whose fault is their own, remember the rest
        and the held events (holding their customers back). Returns how many were set
        aside."""
        now = time.monotonic()
        # Lone: every suspect there is is this round's, and of one customer (by the ids its
        # events name): nothing else is failing to call it a fault of the system.
        named = [set.union(*_own_keys(e)) for e, _ in rnd.suspects + rnd.unresolved]
        lone = not self._holds.with_suspects() and bool(named) and bool(set.intersection(*named))
        dead = 0
        keep: list[tuple[StoredEvent, _Failure]] = []
        for e, err, held, tried in (
            *((e, err, False, True) for e, err in rnd.suspects),
            *((e, err, False, False) for e, err in rnd.unresolved),
            *((e, err, True, False) for e, err in rnd.held),
        ):
            rec = previous.get(e.id)
            if rec is None:
                rec = _Failure(
                    e.id, e.message_id, err, held, first=now, seq=self._routed_seq,
                    backoff=self.hold_retry,
                )  # fmt: skip
            else:
                rec.backoff = min(rec.backoff * 2, self.hold_retry_max)
            rec.error, rec.held = err, held
            if tried:
                rec.failures += 2  # it failed on its own twice in this round
                alone_long_enough = (
                    lone and rec.failures >= LONE_FAILURES and now - rec.first >= self.lone_span
                )
                if rnd.routed or self._routed_seq > rec.seq or alone_long_enough:
                    await self._set_aside(conn, e.id, e.message_id, err, failures=rec.failures)
                    dead += 1
                    continue
            keep.append((e, rec))
        if not keep:
            return dead
        keys = await self._customer_keys(conn, [e for e, _ in keep])
        lost = 0
        for e, rec in keep:
            users, anons = keys[e.id]
            hold = _Hold(users, anons, {e.id: rec}, now + rec.backoff, rec.first, rec.seq)
            if not self._holds.put(hold):
                lost += 1
        if lost:
            log.warning("router.holds_full", not_held=lost, limit=self._holds.limit)
        return dead

    async def _customer_keys(
        self, conn: asyncpg.Connection, events: list[StoredEvent]
    ) -> dict[int, tuple[set[str], set[str]]]:
        """Every user and anonymous id of each event's customer (and those it names)."""
        own = {e.id: _own_keys(e) for e in events}
        users = {u for us, _ in own.values() for u in us}
        anons = {a for _, as_ in own.values() for a in as_}
        known = await customer_identities(conn, users, anons)
        out: dict[int, tuple[set[str], set[str]]] = {}
        for e in events:
            us, as_ = own[e.id]
            all_users, all_anons = set(us), set(as_)
            for key in [("user", u) for u in us] + [("anonymous", a) for a in as_]:
                for kind, value in known.get(key, ()):
                    (all_users if kind == "user" else all_anons).add(value)
            out[e.id] = (all_users, all_anons)
        return out

    async def _block(
        self, conn: asyncpg.Connection, rnd: _Round, events: list[StoredEvent]
    ) -> None:
        """Hold these events' customers back for the rest of the round."""
        for users, anons in (await self._customer_keys(conn, events)).values():
            rnd.users |= users
            rnd.anons |= anons

    async def _route_isolating(
        self, conn: asyncpg.Connection, events: list[StoredEvent], rnd: _Round
    ) -> None:
        """Route these events; if their data makes that fail, halve them until the events
        that fail on their own are found (suspects, see `_settle`). Events whose stored run
        state is unusable are held back the same way, with their customer's later events.
        Once the round's budget is spent, a chunk that fails is not halved any more: its
        events wait for `retry_holds` (unresolved). Outages propagate."""
        if rnd.users or rnd.anons:
            rnd.skipped += [e for e in events if _names_any(e, rnd.users, rnd.anons)]
            events = [e for e in events if not _names_any(e, rnd.users, rnd.anons)]
            if not events:
                return
        rnd.attempts += 1
        try:
            await self._route_events(conn, events)
            rnd.routed += len(events)
            return
        except Exception as err:
            if not (data_error(err) or isinstance(err, RunStateUnusable)):
                raise
            log.warning("router.chunk_failed", events=len(events), error=repr(err))
            failure: BaseException = err
        if len(events) > 1:
            if rnd.attempts >= rnd.budget:
                rnd.unresolved += [(e, failure) for e in events]
                await self._block(conn, rnd, events)
                return
            half = len(events) // 2  # in order: earlier events are routed first
            await self._route_isolating(conn, events[:half], rnd)
            await self._route_isolating(conn, events[half:], rnd)
            return
        rnd.attempts += 1
        try:  # once more alone: only an error that repeats is the event's own
            await self._route_events(conn, events)
            rnd.routed += 1
        except RunStateUnusable as err:
            log.error(
                "router.run_state_unusable", event_id=events[0].id,
                customer_id=events[0].customer_id or None, error=str(err),
            )  # fmt: skip
            rnd.held.append((events[0], err))
            await self._block(conn, rnd, events)
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
        self._routed_seq += len(events)
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
                if routed.unreadable:  # held back, never routed past the journey
                    raise RunStateUnusable(routed.unreadable)
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
