"""Privacy requests (admin key): erase a customer, export everything held about them, and
Segment-style regulations mapped onto the same erasure workflow."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError

from api.deps import AdminDep, PoolDep, SettingsDep, TemporalDep
from api.errors import ApiError
from api.routes.customers import get_customer, get_journeys
from core.logs import get_logger
from models.privacy import (
    CustomerExport,
    ErasureInput,
    ErasureMode,
    ErasurePublic,
    RegulationPublic,
    RegulationRequest,
)
from store.erasure import erasure_for_ref, export_rows, get_erasure, start_erasure
from store.profiles import find_customer
from workflows.erase import ErasureWorkflow, erasure_workflow_id

router = APIRouter(tags=["privacy"], dependencies=[AdminDep])
log = get_logger("privacy")

# Until API keys name their holder, every admin request is made by "the admin key".
REQUESTED_BY = "admin-key"
_MODES: dict[str, ErasureMode] = {
    "DELETE": "erase",
    "SUPPRESS": "suppress",
    "SUPPRESS_WITH_DELETE": "suppress_and_erase",
}


async def _erase(
    ref: str,
    mode: ErasureMode,
    source: str,
    pool: PoolDep,
    temporal: TemporalDep,
    settings: SettingsDep,
) -> ErasurePublic | None:
    """The erasure of the customer `ref` names, started (or joined) now; a ref that names no
    customer answers its past erasure, if any (None: unknown)."""
    cid = await find_customer(pool, ref)
    if cid is None:
        row = await erasure_for_ref(pool, ref)
        return ErasurePublic.model_validate(dict(row)) if row else None
    async with pool.acquire() as conn, conn.transaction():
        row, created = await start_erasure(
            conn, cid, requested_by=REQUESTED_BY, source=source, mode=mode
        )
        if row["mode"] != mode:
            raise ApiError(
                409,
                "conflict",
                f"ref: a {row['mode']} of this customer is in progress ({row['id']})",
            )
        # Started before the row commits: a start Temporal refuses rolls the row back (503,
        # the client retries), so no running erasure is ever left that nothing carries out.
        # If the commit fails after the start, the workflow's first step waits for the row a
        # while and then ends (activities.erasure_activities.ORPHAN_WAIT). Started on a
        # repeat too: the same workflow id joins the one running.
        try:
            await temporal.start_workflow(
                ErasureWorkflow.run,
                ErasureInput(erasure_id=row["id"]),
                id=erasure_workflow_id(row["id"]),
                task_queue=settings.temporal_task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                static_summary=f"customer {mode}",
            )
        except RPCError as err:
            log.warning("erasure.not_started", erasure_id=row["id"], error=str(err))
            raise ApiError(
                503, "unavailable", "ref: the erasure could not be started; retry later"
            ) from err
    log.info(
        "erasure.requested",
        erasure_id=row["id"],
        created=created,
        mode=mode,
        source=source,
        customer_hash=row["customer_hash"],
        requested_by=REQUESTED_BY,
    )
    return ErasurePublic.model_validate(dict(row))


@router.delete("/v1/customers/{ref}", response_model=ErasurePublic, status_code=202)
async def erase_customer(
    ref: str, pool: PoolDep, temporal: TemporalDep, settings: SettingsDep
) -> ErasurePublic:
    """Erase a customer: their runs end, their Temporal executions and every row of theirs are
    deleted; only a hashed suppression of opted-out addresses stays. Durable (a workflow) and
    idempotent: a repeat answers the same erasure. Follow it with `GET /v1/erasures/{id}`."""
    erasure = await _erase(ref, "erase", "api", pool, temporal, settings)
    if erasure is None:
        raise ApiError(
            404, "not_found", f"ref: no customer with id, userId, anonymousId or email {ref!r}"
        )
    return erasure


@router.get("/v1/erasures/{erasure_id}", response_model=ErasurePublic)
async def get_erasure_status(erasure_id: str, pool: PoolDep) -> ErasurePublic:
    """Who asked, when, the erased customer id's hash, status and what was deleted."""
    row = await get_erasure(pool, erasure_id)
    if row is None:
        raise ApiError(404, "not_found", f"erasure_id: no erasure {erasure_id!r}")
    return ErasurePublic.model_validate(dict(row))


@router.post("/v1/regulations", response_model=RegulationPublic, status_code=202)
async def regulate(
    body: RegulationRequest, pool: PoolDep, temporal: TemporalDep, settings: SettingsDep
) -> RegulationPublic:
    """Segment's regulations: `DELETE` erases, `SUPPRESS` keeps the customer's addresses
    suppressed (hashed) without deleting, `SUPPRESS_WITH_DELETE` does both. One erasure per
    subject; `regulateId` is the first one's id."""
    mode = _MODES[body.regulation_type]
    erasures: list[ErasurePublic] = []
    unknown: list[str] = []
    for subject in dict.fromkeys(body.subject_ids):
        erasure = await _erase(subject, mode, "regulation", pool, temporal, settings)
        if erasure is None:
            unknown.append(subject)
        else:
            erasures.append(erasure)
    if not erasures:
        raise ApiError(404, "not_found", f"subjectIds: no customer with userId {unknown[0]!r}")
    return RegulationPublic(regulate_id=erasures[0].id, erasures=erasures, unknown_subjects=unknown)


@router.get("/v1/customers/{ref}/export", response_model=CustomerExport)
async def export_customer(ref: str, pool: PoolDep, temporal: TemporalDep) -> CustomerExport:
    """Everything held about a customer: profile, identities, events, messages (with the
    in-app inbox), journey runs with their steps, tasks, consent and suppressions."""
    profile = await get_customer(ref, pool)
    rows = await export_rows(pool, profile.id)
    messages = rows["messages"]
    return CustomerExport(
        exported_at=datetime.now(UTC),
        customer=profile,
        merged_ids=rows["merged_ids"],
        identities=profile.identities,
        events=rows["events"],
        messages=messages,
        inbox=[m for m in messages if m["channel"] == "in_app"],
        runs=await get_journeys(ref, pool, temporal),
        tasks=rows["tasks"],
        consent=rows["consent"],
        suppressions=rows["suppressions"],
    )
