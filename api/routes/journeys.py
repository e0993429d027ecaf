"""Journeys (admin key): drafts, validation, versions, lifecycle, enrollment."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from temporalio.client import WorkflowUpdateFailedError, WorkflowUpdateStage
from temporalio.service import RPCError

from activities.enrollment import (
    Start,
    enroll,
    load_history,
    mark_started,
    run_key_of,
    start_run,
)
from api.body import openapi_body, read_text
from api.deps import AdminDep, PoolDep, SettingsDep, TemporalDep
from api.errors import ApiError
from models.definition_text import ParsedText, located
from models.journey import JourneyDefinition
from models.loading import RUNTIME
from models.public import (
    EnrollmentPublic,
    EnrollRequest,
    JourneyPublic,
    LifecycleRequest,
    LifecycleResult,
    MigrationReport,
    MigrationRequest,
    ValidationReport,
)
from models.runtime import JourneyEvent, SteerCommand
from models.validation import warnings
from store.journeys import (
    DefinitionError,
    active_definitions,
    parse_definition,
    publish,
    resolve_templates,
    save_draft,
)
from store.profiles import find_customer
from workflows.journey import JourneyWorkflow, workflow_id_for

router = APIRouter(prefix="/v1/journeys", tags=["journeys"], dependencies=[AdminDep])

_LIST = """
SELECT j.id, j.name, j.status, j.current_version, v.definition, j.draft IS NOT NULL AS has_draft,
       (SELECT count(*) FROM journey_runs r WHERE r.journey_id = j.id AND r.status = 'running')
         AS live_runs,
       coalesce((SELECT json_agg(json_build_object(
                  'version', x.version, 'created_at', x.created_at,
                  'live_runs', (SELECT count(*) FROM journey_runs r WHERE r.journey_id = j.id
                                AND r.journey_version = x.version AND r.status = 'running'))
                  ORDER BY x.version)
                 FROM journey_versions x WHERE x.journey_id = j.id), '[]') AS versions,
       coalesce((SELECT json_object_agg(s.status, s.n) FROM (
                  SELECT CASE WHEN r.status = 'running' AND j.status = 'paused' THEN 'held'
                              ELSE r.status END AS status, count(*) AS n
                  FROM journey_runs r WHERE r.journey_id = j.id GROUP BY 1) s), '{}') AS runs,
       coalesce((SELECT json_object_agg(k.reason, k.n) FROM (
                  SELECT reason, count(*) AS n FROM entry_skips e WHERE e.journey_id = j.id
                  GROUP BY 1) k), '{}') AS not_entered
FROM journeys j
LEFT JOIN journey_versions v ON v.journey_id = j.id AND v.version = j.current_version
"""


@router.get("", response_model=list[JourneyPublic])
async def list_journeys(pool: PoolDep) -> list[JourneyPublic]:
    """Every journey with its status, versions and live runs (per version)."""
    return [
        JourneyPublic.model_validate(dict(r)) for r in await pool.fetch(_LIST + " ORDER BY j.id")
    ]


@router.get("/schema")
async def definition_schema() -> dict[str, Any]:
    """JSON Schema of a journey definition, for editors and linters."""
    return JourneyDefinition.model_json_schema(by_alias=True)


@router.get("/{journey_id}", response_model=JourneyPublic)
async def get_journey(journey_id: str, pool: PoolDep) -> JourneyPublic:
    row = await pool.fetchrow(_LIST + " WHERE j.id = $1", journey_id)
    if row is None:
        raise ApiError(404, "not_found", f"no journey {journey_id!r}")
    return JourneyPublic.model_validate(dict(row))


@router.post("/{journey_id}/enroll", response_model=EnrollmentPublic)
async def enroll_customer(
    journey_id: str,
    body: EnrollRequest,
    pool: PoolDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    response: Response,
) -> EnrollmentPublic:
    """Enter one customer now, with `context` as the entry data. Idempotent on
    `idempotency_key`: a repeat answers 200 with the same enrollment; a new one 201."""
    defn = next((d for d in await active_definitions(pool) if d.id == journey_id), None)
    if defn is None:
        status = await pool.fetchval("SELECT status FROM journeys WHERE id = $1", journey_id)
        if status is None or status == "draft":
            raise ApiError(404, "not_found", f"no active journey {journey_id!r}")
        action = "resume it to enroll" if status == "paused" else "it takes no entries"
        raise ApiError(
            409, f"journey_{status}", f"journey_id: journey {journey_id!r} is {status}; {action}"
        )
    cid = await find_customer(pool, body.customer)
    if cid is None:
        raise ApiError(404, "not_found", f"customer: no customer {body.customer!r}")
    entry = JourneyEvent(
        message_id=f"enroll:{body.idempotency_key}",
        type="enroll",
        event=journey_id,
        properties=body.context,
        timestamp=datetime.now(UTC),
        customer_id=cid,
    )
    async with pool.acquire() as conn:
        async with conn.transaction():
            wid = workflow_id_for(journey_id, cid, run_key_of(defn, entry))
            prior = await conn.fetchrow(
                "SELECT enrollment_id, workflow_id, journey_version, status FROM journey_runs "
                "WHERE enrollment_id = $1",
                f"{wid}:{entry.message_id}",
            )
            if prior is not None:
                return EnrollmentPublic(
                    enrollment_id=prior["enrollment_id"],
                    workflow_id=prior["workflow_id"],
                    customer_id=cid,
                    journey_id=journey_id,
                    version=prior["journey_version"],
                    status=prior["status"],
                    created=False,
                )
            history = (await load_history(conn, [cid]))[(cid, journey_id)]
            start = await enroll(conn, defn, cid, entry, [entry], history)
            if not isinstance(start, Start):
                raise ApiError(409, "not_enrolled", f"customer {body.customer!r}: {start}")
        run_id = await start_run(
            temporal, settings.temporal_task_queue, settings.journey_history_limit, start
        )
        await mark_started(conn, [start])
    response.status_code = 201
    return EnrollmentPublic(
        enrollment_id=start.enrollment_id,
        workflow_id=start.workflow_id,
        customer_id=cid,
        journey_id=journey_id,
        version=defn.version,
        status="running" if run_id else "starting",
        created=True,
    )


async def _report(pool: PoolDep, text: ParsedText) -> ValidationReport:
    try:
        defn = await resolve_templates(pool, parse_definition(text), text=text)
    except DefinitionError as err:
        return ValidationReport(valid=False, errors=[str(p) for p in err.problems])
    return ValidationReport(valid=True, errors=[], warnings=warnings(defn))


_DEFINITION = "a journey definition (GET /v1/journeys/schema), as JSON or YAML"
_DEFINITION_SCHEMA = {"type": "object", "description": _DEFINITION}


async def _definition(request: Request, journey_id: str) -> ParsedText | None:
    """The body's definition with `id` set from the path (it may be left out, not differ)."""
    text = await read_text(request, "a journey definition", required=False)
    if text is None:
        return None
    given = text.data.get("id", journey_id)
    if given != journey_id:
        where = text.position(("id",))
        raise ApiError(
            400, "invalid_definition", located("id", f"{given!r} is not {journey_id!r}", where)
        )
    return text.with_data({**text.data, "id": journey_id})


@router.put(
    "/{journey_id}/draft",
    response_model=ValidationReport,
    openapi_extra=openapi_body(_DEFINITION_SCHEMA, _DEFINITION),
)
async def save_journey_draft(journey_id: str, pool: PoolDep, request: Request) -> ValidationReport:
    """Create or update the draft (kept even when invalid; the report says what to fix)."""
    text = await _definition(request, journey_id)
    if text is None:
        raise ApiError(400, "invalid_request", "body: a journey definition is required")
    await save_draft(pool, journey_id, text.data)
    return await _report(pool, text)


@router.get("/{journey_id}/draft")
async def get_journey_draft(journey_id: str, pool: PoolDep) -> dict[str, Any]:
    draft = await pool.fetchval("SELECT draft FROM journeys WHERE id = $1", journey_id)
    if draft is None:
        raise ApiError(404, "not_found", f"journey {journey_id!r} has no draft")
    return draft


@router.post(
    "/{journey_id}/validate",
    response_model=ValidationReport,
    openapi_extra=openapi_body(
        _DEFINITION_SCHEMA, f"{_DEFINITION}; none: the draft", required=False
    ),
)
async def validate_journey(journey_id: str, pool: PoolDep, request: Request) -> ValidationReport:
    """Dry run: validate the given definition, or the draft; nothing is stored."""
    text = await _definition(request, journey_id)
    if text is None:
        data = await pool.fetchval("SELECT draft FROM journeys WHERE id = $1", journey_id)
        if data is None:
            raise ApiError(404, "not_found", f"journey {journey_id!r} has no draft")
        text = ParsedText({**data, "id": journey_id})
    return await _report(pool, text)


@router.post("/{journey_id}/publish", response_model=JourneyPublic)
async def publish_journey_draft(journey_id: str, pool: PoolDep) -> JourneyPublic:
    """Publish the draft as a new immutable version; runs in flight keep theirs."""
    draft = await pool.fetchval("SELECT draft FROM journeys WHERE id = $1", journey_id)
    if draft is None:
        raise ApiError(404, "not_found", f"journey {journey_id!r} has no draft")
    try:
        defn = parse_definition(draft)
        await publish(pool, defn)
    except DefinitionError as err:
        raise ApiError(400, "invalid_definition", str(err)) from None
    await pool.execute("UPDATE journeys SET draft = NULL WHERE id = $1", journey_id)
    published = await get_journey(journey_id, pool)
    return published.model_copy(update={"warnings": warnings(defn)})


async def _signal_runs(pool: PoolDep, temporal: TemporalDep, journey_id: str, act: Any) -> int:
    rows = await pool.fetch(
        "SELECT workflow_id FROM journey_runs WHERE journey_id = $1 AND status = 'running'",
        journey_id,
    )
    sem = asyncio.Semaphore(32)

    async def one(row: Any) -> bool:
        async with sem:
            try:
                # By workflow id: the run as it is now, after any continue-as-new.
                await act(temporal.get_workflow_handle(row["workflow_id"]))
                return True
            except (RPCError, WorkflowUpdateFailedError):
                return False  # finished meanwhile

    return sum(await asyncio.gather(*(one(r) for r in rows)))


async def _set_status(pool: PoolDep, journey_id: str, status: str, allowed: set[str]) -> None:
    current = await pool.fetchval("SELECT status FROM journeys WHERE id = $1", journey_id)
    if current is None:
        raise ApiError(404, "not_found", f"no journey {journey_id!r}")
    if current not in allowed:
        raise ApiError(409, "invalid_state", f"journey {journey_id!r} is {current}")
    await pool.execute(
        "UPDATE journeys SET status = $2, updated_at = now() WHERE id = $1", journey_id, status
    )
    await pool.execute("NOTIFY journeys_changed")


def _exit(reason: str) -> Any:
    """Exit a run: answered once the run has accepted it (it exits before its next step), so
    a run stuck in a step (a send retrying while its provider is down) does not hold the call."""
    cmd = SteerCommand(action="exit", reason=reason, by="journey lifecycle")
    return lambda h: h.start_update(
        JourneyWorkflow.steer, cmd, wait_for_stage=WorkflowUpdateStage.ACCEPTED
    )


def _hold(held: bool) -> Any:
    """Pause or resume a run: two signals, so the Temporal timeline says which."""
    signal = JourneyWorkflow.pause_run if held else JourneyWorkflow.resume_run
    return lambda h: h.signal(signal)


@router.post("/{journey_id}/pause", response_model=LifecycleResult)
async def pause_journey(
    journey_id: str, pool: PoolDep, temporal: TemporalDep, body: LifecycleRequest | None = None
) -> LifecycleResult:
    """No new entries. Customers in flight either hold before their next step until the
    journey is resumed (`hold`, the default) or exit now (`exit`). Nobody is dropped silently."""
    body = body or LifecycleRequest()
    if body.in_flight == "finish":
        raise ApiError(400, "invalid_request", "in_flight: pause takes hold or exit")
    await _set_status(pool, journey_id, "paused", {"active", "paused"})
    act = _exit(body.reason) if body.in_flight == "exit" else _hold(True)
    n = await _signal_runs(pool, temporal, journey_id, act)
    return LifecycleResult(id=journey_id, status="paused", runs_affected=n)


@router.post("/{journey_id}/resume", response_model=LifecycleResult)
async def resume_journey(journey_id: str, pool: PoolDep, temporal: TemporalDep) -> LifecycleResult:
    await _set_status(pool, journey_id, "active", {"paused"})
    n = await _signal_runs(pool, temporal, journey_id, _hold(False))
    return LifecycleResult(id=journey_id, status="active", runs_affected=n)


@router.post("/{journey_id}/archive", response_model=LifecycleResult)
async def archive_journey(
    journey_id: str, pool: PoolDep, temporal: TemporalDep, body: LifecycleRequest | None = None
) -> LifecycleResult:
    """No new entries, ever; runs in flight `finish` (also released if held) or `exit`."""
    body = body or LifecycleRequest(in_flight="finish", reason="journey archived")
    if body.in_flight == "hold":
        raise ApiError(400, "invalid_request", "in_flight: archive takes finish or exit")
    await _set_status(pool, journey_id, "archived", {"active", "paused", "draft"})
    act = _exit(body.reason) if body.in_flight == "exit" else _hold(False)
    n = await _signal_runs(pool, temporal, journey_id, act)
    return LifecycleResult(id=journey_id, status="archived", runs_affected=n)


@router.post("/{journey_id}/migrate", response_model=MigrationReport)
async def migrate_runs(
    journey_id: str, body: MigrationRequest, pool: PoolDep, temporal: TemporalDep
) -> MigrationReport:
    """Move customers in flight from one version to another by an explicit step mapping.
    `dry_run` (the default) only counts who would move; nothing else ever moves a run."""
    current = await pool.fetchval("SELECT current_version FROM journeys WHERE id = $1", journey_id)
    if current is None:
        raise ApiError(404, "not_found", f"no journey {journey_id!r}")
    to_version = body.to_version or current
    versions = {
        r["version"]: JourneyDefinition.model_validate(r["definition"], context=RUNTIME)
        for r in await pool.fetch(
            "SELECT version, definition FROM journey_versions WHERE journey_id = $1 "
            "AND version = ANY($2::int[])",
            journey_id,
            [body.from_version, to_version],
        )
    }
    if body.from_version not in versions or to_version not in versions:
        raise ApiError(404, "not_found", f"versions {body.from_version} and {to_version}")
    if to_version <= body.from_version:
        raise ApiError(400, "invalid_request", "to_version must be later than from_version")
    old, new = versions[body.from_version], versions[to_version]
    for src, dst in body.step_map.items():
        if src not in {s.id for s in old.steps}:
            raise ApiError(400, "invalid_request", f"step_map: no step {src!r} in v{old.version}")
        if dst not in {s.id for s in new.steps}:
            raise ApiError(400, "invalid_request", f"step_map: no step {dst!r} in v{new.version}")
    rows = await pool.fetch(
        "SELECT enrollment_id, workflow_id FROM journey_runs WHERE journey_id = $1 "
        "AND journey_version = $2 AND status = 'running'",
        journey_id,
        body.from_version,
    )
    sem = asyncio.Semaphore(32)

    async def position(row: Any) -> tuple[Any, str | None]:
        async with sem:
            try:
                handle = temporal.get_workflow_handle(row["workflow_id"])
                summary = await handle.query(JourneyWorkflow.summary)
            except RPCError:
                return row, None
        return row, summary.step_id if summary.status in ("running", "held") else None

    placed = await asyncio.gather(*(position(r) for r in rows))
    would: dict[str, int] = {}
    staying: dict[str, int] = {}
    for _, step in placed:
        if step is None:
            continue
        bucket = would if step in body.step_map else staying
        bucket[step] = bucket.get(step, 0) + 1
    moved = failed = 0
    if not body.dry_run:

        async def move(row: Any, step: str) -> bool:
            cmd = SteerCommand(
                action="migrate",
                step_id=body.step_map[step],
                reason=body.reason,
                by="migration",
                definition=new,
            )
            async with sem:
                try:
                    handle = temporal.get_workflow_handle(row["workflow_id"])
                    await handle.execute_update(JourneyWorkflow.steer, cmd)
                except (RPCError, WorkflowUpdateFailedError):
                    return False  # moved on meanwhile: it stays on its version
            await pool.execute(
                "UPDATE journey_runs SET journey_version = $2 WHERE enrollment_id = $1",
                row["enrollment_id"],
                new.version,
            )
            return True

        results = await asyncio.gather(
            *(move(r, s) for r, s in placed if s is not None and s in body.step_map)
        )
        moved, failed = sum(results), len(results) - sum(results)
    return MigrationReport(
        from_version=body.from_version,
        to_version=to_version,
        dry_run=body.dry_run,
        would_move=would,
        staying=staying,
        moved=moved,
        failed=failed,
    )


@router.post(
    "", response_model=JourneyPublic, openapi_extra=openapi_body(_DEFINITION_SCHEMA, _DEFINITION)
)
async def publish_journey(pool: PoolDep, request: Request) -> JourneyPublic:
    """Validate and publish a definition as a new immutable version (unchanged: same version).
    JSON or YAML; every error names the field, the step, and the line and column."""
    text = await read_text(request, "a journey definition")
    assert text is not None  # required
    try:
        defn = parse_definition(text)
        await publish(pool, defn, text=text)
    except DefinitionError as err:
        raise ApiError(400, "invalid_definition", str(err)) from None
    published = await get_journey(defn.id, pool)
    return published.model_copy(update={"warnings": warnings(defn)})
