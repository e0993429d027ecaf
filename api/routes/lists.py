"""Lists people expect: a journey's runs, customers by id/email/trait, audience launches.

All are keyset-paged (`limit` + the `next_cursor` of the previous page; store.listing) and read
only. Access: the `read` scope (api/scopes.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from temporalio.client import Client
from temporalio.service import RPCError

from api.deps import AdminDep, PoolDep, TemporalDep
from api.errors import ApiError
from api.routes.launches import LaunchPublic
from core.logs import get_logger
from core.temporal import JOURNEY_STEP
from models.public import CustomerPublic, Int32
from store import listing

log = get_logger("api.lists")
router = APIRouter(tags=["lists"], dependencies=[AdminDep])

RunStatus = Literal["starting", "running", "completed", "exited", "ended"]
LaunchStatus = Literal["running", "completed", "cancelled"]
Limit = Query(50, ge=1, le=500, description="page size")
Cursor = Query(
    None, max_length=512, description="`next_cursor` of the previous page (absent: first page)"
)
# Step ids of a definition (models.journey.Step.id) and the markers `(start)` / `(finished)`:
# nothing that could break out of a quoted literal in a Temporal visibility query.
STEP_PATTERN = r"^\(?[a-z0-9][a-z0-9_\-]*\)?$"
# The step filter asks Temporal visibility for the live runs at that step; past this many it
# asks the caller to narrow the filter instead of building an unbounded id list.
MAX_STEP_MATCHES = 10_000


class RunListItem(BaseModel):
    enrollment_id: str
    workflow_id: str
    run_id: str | None
    customer_id: str
    version: int
    status: str = Field(description="starting | running | completed | exited | ended")
    current_step: str | None = Field(
        description="live runs only: the step it is at, from Temporal visibility (the "
        "`JourneyStep` search attribute; eventually consistent); null for ended runs"
    )
    exit_reason: str | None
    started_at: datetime
    ended_at: datetime | None
    goal_at: datetime | None
    arm: str | None
    holdout: bool


class RunPage(BaseModel):
    items: list[RunListItem]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class CustomerPage(BaseModel):
    items: list[CustomerPublic]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class LaunchPage(BaseModel):
    items: list[LaunchPublic]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


def _quoted(value: str) -> str | None:
    """A visibility-query string literal, or None for a value that cannot be one safely."""
    if any(c in value for c in "'\"\\") or not value.isprintable():
        return None
    return f"'{value}'"


async def _workflows_at_step(
    temporal: Client, journey_id: str, step: str, version: int | None
) -> list[str]:
    """The live workflows of the journey (and version) at `step` (STEP_PATTERN: no quotes)."""
    journey = _quoted(journey_id)
    if journey is None:
        return []  # no journey has such an id (models.journey: ids are [a-z0-9_-])
    query = f"JourneyId = {journey} AND JourneyStep = '{step}' AND ExecutionStatus = 'Running'"
    if version is not None:
        query += f" AND JourneyVersion = {int(version)}"
    ids: list[str] = []
    async for execution in temporal.list_workflows(query, page_size=1000):
        ids.append(execution.id)
        if len(ids) > MAX_STEP_MATCHES:
            raise ApiError(
                400,
                "too_many_matches",
                f"step: more than {MAX_STEP_MATCHES} live runs are at step {step!r}; "
                "narrow with version or status",
            )
    return ids


async def _current_steps(temporal: Client, workflow_ids: list[str]) -> dict[str, str]:
    """Each live workflow's step, in one visibility query for the whole page."""
    literals = [q for q in map(_quoted, workflow_ids) if q is not None]
    if not literals:
        return {}
    query = f"WorkflowId IN ({', '.join(literals)}) AND ExecutionStatus = 'Running'"
    out: dict[str, str] = {}
    async for execution in temporal.list_workflows(query, page_size=len(literals)):
        step = execution.typed_search_attributes.get(JOURNEY_STEP)
        if step is not None:
            out[execution.id] = step
    return out


@router.get("/v1/journeys/{journey_id}/runs", response_model=RunPage)
async def list_runs(
    journey_id: str,
    pool: PoolDep,
    temporal: TemporalDep,
    status: RunStatus | None = None,
    version: Int32 | None = Query(None, ge=1, description="the version runs entered with"),
    step: str | None = Query(
        None,
        max_length=66,
        pattern=STEP_PATTERN,
        description="live runs now at this step (Temporal visibility: eventually consistent)",
    ),
    limit: int = Limit,
    cursor: str | None = Cursor,
) -> RunPage:
    """A journey's runs (enrollments), newest first. `journey_runs` does not store the current
    step (the workflow does); it comes from Temporal's `JourneyStep` search attribute."""
    if await pool.fetchval("SELECT 1 FROM journeys WHERE id = $1", journey_id) is None:
        raise ApiError(404, "not_found", f"no journey {journey_id!r}")
    try:
        at_step = (
            None if step is None else await _workflows_at_step(temporal, journey_id, step, version)
        )
        page = await listing.journey_runs(
            pool,
            journey_id,
            limit=limit,
            cursor=cursor,
            status=status,
            version=version,
            workflow_ids=at_step,
        )
    except listing.BadCursor as err:
        raise ApiError(400, "invalid_request", f"cursor: {err}") from None
    except RPCError as err:
        log.warning("api.visibility_unavailable", error=str(err))
        raise ApiError(503, "unavailable", "step: Temporal visibility is unavailable") from None
    live = [r["workflow_id"] for r in page.rows if r["status"] in listing.LIVE_RUN_STATUSES]
    try:
        steps = await _current_steps(temporal, live)
    except RPCError as err:  # the stored rows still answer, without their steps
        log.warning("api.visibility_unavailable", error=str(err))
        steps = {}
    return RunPage(
        items=[
            RunListItem(
                **{k: v for k, v in dict(r).items() if k not in ("journey_id", "run_key")},
                version=r["journey_version"],
                current_step=steps.get(r["workflow_id"])
                if r["status"] in listing.LIVE_RUN_STATUSES
                else None,
            )
            for r in page.rows
        ],
        next_cursor=page.next_cursor,
    )


def _trait_filters(request: Request, pairs: list[str]) -> dict[str, str]:
    """`?trait.plan=pro` and `?trait=plan:pro` (repeatable; all must match)."""
    found: list[tuple[str, str, str]] = [
        (f"trait.{k[6:]}", k[6:], v) for k, v in request.query_params.multi_items()
        if k.startswith("trait.")
    ]  # fmt: skip
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep:
            raise ApiError(400, "invalid_request", f"trait: {pair!r} is not name:value")
        found.append(("trait", name, value))
    out: dict[str, str] = {}
    for param, name, value in found:
        if not name or len(name) > 200:
            raise ApiError(400, "invalid_request", f"{param}: a trait name of 1-200 characters")
        if len(value) > 1000:
            raise ApiError(400, "invalid_request", f"{param}: value longer than 1000 characters")
        if name in out and out[name] != value:
            raise ApiError(400, "invalid_request", f"{param}: two values for trait {name!r}")
        out[name] = value
    return out


@router.get("/v1/customers", response_model=CustomerPage)
async def list_customers(
    request: Request,
    pool: PoolDep,
    user_id: str | None = Query(None, alias="userId", max_length=512),
    email: str | None = Query(None, max_length=512, description="case-insensitive"),
    trait: list[str] = Query(
        default=[],
        max_length=20,
        description="`name:value`, e.g. `plan:pro` (also `?trait.plan=pro`); all must match; "
        "a value matches the trait's text form (`42`, `true`)",
    ),
    limit: int = Limit,
    cursor: str | None = Cursor,
) -> CustomerPage:
    """Customers, newest first, with their identities; search by userId, email and traits."""
    traits = _trait_filters(request, trait)
    try:
        page = await listing.customers(
            pool, limit=limit, cursor=cursor, user_id=user_id, email=email, traits=traits
        )
    except listing.BadCursor as err:
        raise ApiError(400, "invalid_request", f"cursor: {err}") from None
    return CustomerPage(
        items=[CustomerPublic.model_validate(dict(r)) for r in page.rows],
        next_cursor=page.next_cursor,
    )


@router.get("/v1/launches", response_model=LaunchPage)
async def list_launches(
    pool: PoolDep,
    journey_id: str | None = Query(None, max_length=64),
    status: LaunchStatus | None = None,
    limit: int = Limit,
    cursor: str | None = Cursor,
) -> LaunchPage:
    """Audience launches, newest first, with their figures as last recorded (GET
    /v1/launches/{id} adds the live figures of a running one)."""
    try:
        page = await listing.launches(
            pool, limit=limit, cursor=cursor, journey_id=journey_id, status=status
        )
    except listing.BadCursor as err:
        raise ApiError(400, "invalid_request", f"cursor: {err}") from None
    return LaunchPage(
        items=[LaunchPublic.model_validate(dict(r)) for r in page.rows],
        next_cursor=page.next_cursor,
    )
