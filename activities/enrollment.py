"""Entering a customer into a journey: the rules, the enrollment row, the start.

Used by the outbox router (event-triggered entries) and the enroll API (API-triggered).
An enrollment row (status `starting`) is committed before the run is started, keyed by the
workflow id and the entry event's messageId, and it holds the entry event: whoever finds a
`starting` row (after a crash) can start it again, and signal-with-start joins the run if it
did start. So an entry is never lost and never started twice.
"""

from __future__ import annotations

import re
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
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from core.temporal import (
    CUSTOMER_ID,
    CUSTOMER_REFS,
    JOURNEY_ID,
    JOURNEY_STATUS,
    JOURNEY_STEP,
    JOURNEY_VERSION,
)
from models.conditions import resolve
from models.durations import parse_duration
from models.journey import JourneyDefinition
from models.runtime import JourneyEvent, JourneyRunInput, customer_refs
from store.profiles import UnroutableEvent
from workflows.journey import JourneyWorkflow, workflow_id_for

log = structlog.stdlib.get_logger("enrollment")

SIGNAL_BYTES = 512 * 1024  # well under Temporal's 2 MB payload limit
SIGNAL_EVENTS = 200


class RunStateUnusable(Exception):
    """Stored state of a run or journey (a pinned definition, a run's entry event) that this
    code cannot read. Not the fault of the event being routed (every event of that customer
    would fail the same way), so the router never dead-letters for it: it holds the events
    back and retries with backoff, loudly, until the state or the code is fixed."""


class EventRejected(UnroutableEvent):
    """The one run these events are for refused them (INVALID_ARGUMENT to a signal: over the
    server's payload limit, past the run's signal limit): the events' fault, not everyone's
    (the router may dead-letter them; a refused start is not this)."""


def rejected(workflow_id: str, err: RPCError) -> EventRejected:
    return EventRejected(f"workflow {workflow_id} refused the events: {err.message}")


def slices(events: list[JourneyEvent]) -> list[list[JourneyEvent]]:
    """Cut a customer's events into signals of bounded count and size, in order.

    Raises:
        UnroutableEvent: one event alone is over `SIGNAL_BYTES`: no signal can carry it, so
            it is its own data's fault (and a server refusing a start or a signal of our
            bounded size says something about the server or the run, not the event).
    """
    out: list[list[JourneyEvent]] = [[]]
    size = 0
    for e in events:
        n = len(e.model_dump_json())
        if n > SIGNAL_BYTES:
            raise UnroutableEvent(
                f"event {e.message_id}: {n} bytes, over the {SIGNAL_BYTES} a signal carries"
            )
        if out[-1] and (size + n > SIGNAL_BYTES or len(out[-1]) >= SIGNAL_EVENTS):
            out.append([])
            size = 0
        out[-1].append(e)
        size += n
    return [part for part in out if part]


_ENROLL = """
INSERT INTO journey_runs (enrollment_id, workflow_id, journey_id, journey_version, customer_id,
                          status, run_key, entry)
VALUES ($1, $2, $3, $4, $5, 'starting', $6, $7)
ON CONFLICT (enrollment_id) DO UPDATE SET enrollment_id = EXCLUDED.enrollment_id
RETURNING status
"""


@dataclass
class Start:
    journey: JourneyDefinition
    customer_id: str
    enrollment_id: str
    workflow_id: str
    events: list[JourneyEvent]
    run_id: str | None = None
    refs: list[str] = field(default_factory=list)  # userIds, emails, anonymousIds


async def load_refs(
    conn: asyncpg.Connection | asyncpg.Pool, customer_ids: list[str]
) -> dict[str, list[str]]:
    """Each customer's `CustomerRefs`: userIds, then emails, then anonymousIds (newest first),
    so the ids operators type survive the cap (`models.runtime.customer_refs`)."""
    out: dict[str, list[str]] = defaultdict(list)
    for r in await conn.fetch(
        "SELECT customer_id, value FROM identities WHERE customer_id = ANY($1::text[]) "
        "AND kind IN ('user', 'email', 'anonymous') ORDER BY customer_id, "
        "CASE kind WHEN 'user' THEN 0 WHEN 'email' THEN 1 ELSE 2 END, created_at DESC, value",
        customer_ids,
    ):
        out[r["customer_id"]].append(r["value"])
    return {cid: customer_refs(values) for cid, values in out.items()}


@dataclass
class LiveRun:
    workflow_id: str
    enrollment_id: str
    run_key: str | None
    version: int = 0
    entry: JourneyEvent | None = None


@dataclass
class RunHistory:
    """What the rules need to know about one customer's runs of one journey."""

    running: list[LiveRun] = field(default_factory=list)
    starting: list[LiveRun] = field(default_factory=list)
    last_started: datetime | None = None
    entries: int = 0

    def live_keys(self) -> set[str | None]:
        return {r.run_key for r in self.running + self.starting}


async def load_history(
    conn: asyncpg.Connection | asyncpg.Pool, customer_ids: list[str]
) -> dict[tuple[str, str], RunHistory]:
    """Each (customer, journey)'s runs.

    Raises:
        RunStateUnusable: a stored entry event no longer validates (the router holds these
            customers' events back instead of dead-lettering them).
    """
    out: dict[tuple[str, str], RunHistory] = defaultdict(RunHistory)
    for r in await conn.fetch(
        "SELECT customer_id, journey_id, workflow_id, enrollment_id, status, started_at, run_key, "
        "journey_version, entry FROM journey_runs WHERE customer_id = ANY($1::text[])",
        customer_ids,
    ):
        h = out[(r["customer_id"], r["journey_id"])]
        try:
            entry = JourneyEvent.model_validate(r["entry"]) if r["entry"] else None
        except ValueError as err:
            raise RunStateUnusable(f"journey_runs {r['enrollment_id']}: entry: {err}") from err
        run = LiveRun(
            r["workflow_id"], r["enrollment_id"], r["run_key"], r["journey_version"], entry
        )
        if r["status"] == "running":
            h.running.append(run)
        elif r["status"] == "starting":
            h.starting.append(run)
        h.entries += 1
        if h.last_started is None or r["started_at"] > h.last_started:
            h.last_started = r["started_at"]
    return out


def run_key_of(journey: JourneyDefinition, entry: JourneyEvent) -> str | None:
    if journey.run_key is None:
        return None
    value = resolve(journey.run_key, entry.as_context())
    return None if value is None else re.sub(r"[^A-Za-z0-9_.\-]", "_", str(value))[:64]


def refusal(journey: JourneyDefinition, history: RunHistory, key: str | None) -> str | None:
    """Why this customer may not enter now, or None."""
    if key in history.live_keys():
        return "already in this journey" + (f" for {key}" if key else "")
    if journey.max_entries is not None and history.entries >= journey.max_entries:
        return f"entry cap of {journey.max_entries} reached"
    rule = journey.re_entry
    if history.last_started is not None:
        if rule.policy == "never":
            return "re-entry is never allowed"
        if rule.policy == "after" and rule.after is not None:
            if datetime.now(UTC) - history.last_started < parse_duration(rule.after):
                return f"re-entry only {rule.after} after the last entry"
    return None


async def enroll(
    conn: asyncpg.Connection,
    journey: JourneyDefinition,
    customer_id: str,
    entry: JourneyEvent,
    events: list[JourneyEvent],
    history: RunHistory,
) -> Start | str:
    """Write the enrollment (in the caller's transaction); a Start, or why not."""
    key = run_key_of(journey, entry)
    why = refusal(journey, history, key)
    if why is not None:
        return why
    wid = workflow_id_for(journey.id, customer_id, key)
    enrollment = f"{wid}:{entry.message_id}"
    try:
        async with conn.transaction():  # a savepoint: a refusal leaves the caller's work intact
            status = await conn.fetchval(
                _ENROLL,
                enrollment,
                wid,
                journey.id,
                journey.version,
                customer_id,
                key,
                entry.model_dump(mode="json"),
            )
    except asyncpg.UniqueViolationError:
        return "already in this journey"  # enrolled concurrently (router vs enroll API)
    if status not in ("starting", "running"):
        return "this entry already ran to its end"
    history.starting.append(LiveRun(wid, enrollment, key))
    history.entries += 1
    history.last_started = datetime.now(UTC)
    refs = (await load_refs(conn, [customer_id])).get(customer_id, [])
    return Start(journey, customer_id, enrollment, wid, events, refs=refs)


async def start_run(
    client: Client, task_queue: str, history_limit: int, start: Start
) -> str | None:
    """Start the run with its events; if this enrollment's run already exists, join it.

    If another run of the same workflow id is still open (the previous enrollment is closing),
    the events go to it (it releases them back to the router when it ends) and this
    enrollment stays `starting`, to be started once that run has closed. Returns the run id,
    or None when deferred.
    """
    journey, cid = start.journey, start.customer_id
    first, *rest = slices(start.events) or [[]]
    try:
        handle = await _start(client, task_queue, history_limit, start, first)
    except WorkflowAlreadyStartedError:
        existing = client.get_workflow_handle(start.workflow_id)
        desc = await existing.describe()
        memo = await desc.memo()
        try:
            for part in slices(start.events):
                await existing.signal(JourneyWorkflow.events, part)
        except RPCError as err:
            if err.status == RPCStatusCode.INVALID_ARGUMENT:
                raise rejected(start.workflow_id, err) from err
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            # It closed between the two calls: now the start goes through.
            return await start_run(client, task_queue, history_limit, start)
        if memo.get("enrollment") != start.enrollment_id:
            log.info("journey.entry_deferred", workflow_id=start.workflow_id, customer_id=cid)
            return None
        start.run_id = desc.run_id
        return desc.run_id
    assert handle.result_run_id is not None
    start.run_id = handle.result_run_id
    try:
        for part in rest:
            await handle.signal(JourneyWorkflow.events, part)
    except RPCError as err:
        if err.status == RPCStatusCode.INVALID_ARGUMENT:
            raise rejected(start.workflow_id, err) from err
        raise
    log.info(
        "journey.entered", customer_id=cid, journey_id=journey.id, workflow_id=start.workflow_id,
        version=journey.version,
    )  # fmt: skip
    return handle.result_run_id


async def _start(
    client: Client, task_queue: str, history_limit: int, start: Start, events: list[JourneyEvent]
) -> Any:
    journey, cid = start.journey, start.customer_id
    return await client.start_workflow(
        JourneyWorkflow.run,
        JourneyRunInput(
            journey=journey,
            customer_id=cid,
            enrollment_id=start.enrollment_id,
            history_limit=history_limit,
            events=events,
            customer_refs=start.refs,
        ),
        id=start.workflow_id,
        task_queue=task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(CUSTOMER_ID, cid),
                SearchAttributePair(JOURNEY_ID, journey.id),
                SearchAttributePair(JOURNEY_VERSION, journey.version),
                SearchAttributePair(JOURNEY_STEP, "(start)"),
                SearchAttributePair(JOURNEY_STATUS, "running"),
                *([SearchAttributePair(CUSTOMER_REFS, start.refs)] if start.refs else []),
            ]
        ),
        memo={
            "journey": journey.name,
            "version": journey.version,
            "customer": cid,
            "enrollment": start.enrollment_id,
        },
        static_summary=f"{journey.name} v{journey.version} for customer "
        + (f"{', '.join(start.refs[:2])} ({cid})" if start.refs else cid),
    )


async def mark_started(conn: asyncpg.Connection | asyncpg.Pool, starts: list[Start]) -> None:
    await conn.executemany(
        "UPDATE journey_runs SET run_id = $2, status = 'running' "
        "WHERE enrollment_id = $1 AND status = 'starting'",
        [(s.enrollment_id, s.run_id) for s in starts if s.run_id],
    )
