"""Read API over a customer: profile, events, messages, journey runs (admin key)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from fastapi import APIRouter, Query
from pydantic import Field
from temporalio.client import WorkflowQueryFailedError, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import AdminDep, PoolDep, TemporalDep
from api.errors import ApiError
from models.public import (
    BigInt,
    CustomerPublic,
    EventPage,
    EventPublic,
    IdentityPublic,
    JourneyRunPublic,
    MessagePage,
    MessagePublic,
)
from models.runtime import RunSummary, SteerCommand
from store.profiles import find_customer
from workflows.journey import JourneyWorkflow

router = APIRouter(prefix="/v1/customers", tags=["customers"], dependencies=[AdminDep])

Limit = Query(100, ge=1, le=1000)
# How long the live view waits for a run's `summary` query (a worker must replay the run to
# answer) before it shows the stored row, marked `stale`.
QUERY_TIMEOUT = timedelta(seconds=3)


async def _customer_id(pool: PoolDep, ref: str) -> str:
    cid = await find_customer(pool, ref)
    if cid is None:
        raise ApiError(
            404, "not_found", f"no customer with id, userId, anonymousId or email {ref!r}"
        )
    return cid


@router.get("/{ref}", response_model=CustomerPublic)
async def get_customer(ref: str, pool: PoolDep) -> CustomerPublic:
    """`ref` is our customer id, a userId, an anonymousId or an email."""
    cid = await _customer_id(pool, ref)
    row = await pool.fetchrow("SELECT * FROM customers WHERE id = $1", cid)
    ids = await pool.fetch(
        "SELECT kind, value FROM identities WHERE customer_id = $1 ORDER BY kind, value", cid
    )
    assert row is not None
    return CustomerPublic(
        id=cid,
        traits=row["traits"],
        timezone=row["timezone"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        identities=[IdentityPublic(kind=r["kind"], value=r["value"]) for r in ids],
    )


@router.get("/{ref}/events", response_model=EventPage)
async def get_events(
    ref: str, pool: PoolDep, limit: int = Limit, before: BigInt | None = None
) -> EventPage:
    """Newest first; page with `before=<next_before>`."""
    cid = await _customer_id(pool, ref)
    # Keyset on (timestamp, id): client timestamps arrive in any order.
    rows = await pool.fetch(
        "SELECT * FROM events WHERE customer_id = $1 AND ($2::bigint IS NULL OR "
        "(timestamp, id) < (SELECT timestamp, id FROM events WHERE id = $2)) "
        "ORDER BY timestamp DESC, id DESC LIMIT $3",
        cid,
        before,
        limit,
    )
    items = [
        EventPublic(
            id=r["id"],
            message_id=r["message_id"],
            type=r["type"],
            event=r["event"],
            timestamp=r["timestamp"],
            received_at=r["received_at"],
            routed=r["routed_at"] is not None,
            properties=r["payload"].get("properties") or {},
            traits=r["payload"].get("traits") or {},
        )
        for r in rows
    ]
    skips = await pool.fetch(
        "SELECT message_id, journey_id, reason FROM entry_skips WHERE customer_id = $1 "
        "AND message_id = ANY($2::text[])",
        cid,
        [e.message_id for e in items],
    )
    by_event: dict[str, dict[str, str]] = {}
    for s in skips:
        by_event.setdefault(s["message_id"], {})[s["journey_id"]] = s["reason"]
    for e in items:
        e.not_entered = by_event.get(e.message_id, {})
    return EventPage(items=items, next_before=items[-1].id if len(items) == limit else None)


@router.get("/{ref}/messages", response_model=MessagePage)
async def get_messages(
    ref: str, pool: PoolDep, limit: int = Limit, before: BigInt | None = None
) -> MessagePage:
    cid = await _customer_id(pool, ref)
    rows = await pool.fetch(
        "SELECT * FROM messages WHERE customer_id = $1 AND ($2::bigint IS NULL OR id < $2) "
        "ORDER BY id DESC LIMIT $3",
        cid,
        before,
        limit,
    )
    items = [MessagePublic.model_validate(dict(r)) for r in rows]
    return MessagePage(items=items, next_before=items[-1].id if len(items) == limit else None)


@router.get("/{ref}/journeys", response_model=list[JourneyRunPublic])
async def get_journeys(ref: str, pool: PoolDep, temporal: TemporalDep) -> list[JourneyRunPublic]:
    """Each run with its current step, pending deadline and step history (live from Temporal)."""
    cid = await _customer_id(pool, ref)
    rows = await pool.fetch(
        "SELECT * FROM journey_runs WHERE customer_id = $1 ORDER BY started_at DESC LIMIT 200", cid
    )

    # The newest enrollment of each workflow id owns that id's current execution.
    latest = set({r["workflow_id"]: r["enrollment_id"] for r in reversed(rows)}.values())

    async def describe(row: dict) -> JourneyRunPublic:
        summary: RunSummary | None = None
        stale: str | None = None
        try:
            if row["enrollment_id"] in latest:
                # By workflow id: the run as it is now, after any continue-as-new.
                handle = temporal.get_workflow_handle(row["workflow_id"])
            else:
                # An earlier enrollment under the same id: its first execution is the one
                # still addressable by itself.
                handle = temporal.get_workflow_handle(row["workflow_id"], run_id=row["run_id"])
            summary = await handle.query(JourneyWorkflow.summary, rpc_timeout=QUERY_TIMEOUT)
        except RPCError as err:
            # The stored row stands, and says so: its step and history are not known here.
            if err.status == RPCStatusCode.NOT_FOUND:
                stale = "workflow history no longer kept (retention)"
            elif err.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
                stale = f"the run did not answer within {QUERY_TIMEOUT.total_seconds():g}s"
                stale += " (no worker, or a busy one)"
            else:
                stale = f"the run could not be asked: {err.message}"
        except WorkflowQueryFailedError as err:
            stale = f"the run could not answer: {err}"
        return JourneyRunPublic(
            journey_id=row["journey_id"],
            version=row["journey_version"],
            workflow_id=row["workflow_id"],
            run_id=row["run_id"],
            status=summary.status if summary else row["status"],
            current_step=summary.step_id if summary else None,
            step_deadline=summary.step_deadline if summary else None,
            exit_reason=summary.exit_reason if summary else row["exit_reason"],
            started_at=row["started_at"],
            ended_at=row["ended_at"],
            history=summary.history if summary else [],
            results=summary.results if summary else {},
            steered=summary.steered if summary else [],
            failures=summary.failures if summary else row["failures"],
            failed=summary.failed if summary else [],
            stale=summary is None,
            stale_reason=stale,
        )

    return list(await asyncio.gather(*(describe(dict(r)) for r in rows)))


class SteerRequest(SteerCommand):
    workflow_id: str | None = Field(
        default=None, description="which run, when the journey keeps several per customer"
    )


@router.post("/{ref}/journeys/{journey_id}/steer", response_model=RunSummary)
async def steer_run(
    ref: str, journey_id: str, body: SteerRequest, pool: PoolDep, temporal: TemporalDep
) -> RunSummary:
    """Exit a customer from a journey, skip the current wait, or move them to a step.
    Validated by the run itself; the reason is recorded in the run's `steered` list."""
    if body.action == "migrate":
        raise ApiError(400, "invalid_request", "action: use POST /v1/journeys/{id}/migrate")
    cid = await _customer_id(pool, ref)
    rows = await pool.fetch(
        "SELECT workflow_id FROM journey_runs WHERE customer_id = $1 AND journey_id = $2 "
        "AND status = 'running' AND ($3::text IS NULL OR workflow_id = $3)",
        cid,
        journey_id,
        body.workflow_id,
    )
    if not rows:
        raise ApiError(404, "not_found", f"customer {ref!r} has no running {journey_id!r} run")
    if len(rows) > 1:
        raise ApiError(409, "ambiguous", "several runs: name one with workflow_id")
    cmd = SteerCommand.model_validate(body.model_dump(exclude={"workflow_id"}))
    handle = temporal.get_workflow_handle(rows[0]["workflow_id"])  # the current run
    try:
        return await handle.execute_update(JourneyWorkflow.steer, cmd)
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        message = getattr(cause, "message", None) or str(cause or err)
        raise ApiError(409, "rejected", message) from None
    except RPCError as err:
        raise ApiError(409, "rejected", err.message) from None
