"""Journey definitions (admin key): list, get, publish a new version."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Body, Response

from activities.enrollment import (
    Start,
    enroll,
    load_history,
    mark_started,
    run_key_of,
    start_run,
)
from api.deps import AdminDep, PoolDep, SettingsDep, TemporalDep
from api.errors import ApiError
from models.journey import JourneyDefinition
from models.public import EnrollmentPublic, EnrollRequest, JourneyPublic
from models.runtime import JourneyEvent
from store.journeys import DefinitionError, active_definitions, parse_definition, publish
from store.profiles import find_customer
from workflows.journey import workflow_id_for

router = APIRouter(prefix="/v1/journeys", tags=["journeys"], dependencies=[AdminDep])

_LIST = """
SELECT j.id, j.name, j.status, j.current_version, v.definition,
       (SELECT count(*) FROM journey_runs r WHERE r.journey_id = j.id AND r.status = 'running')
         AS live_runs
FROM journeys j JOIN journey_versions v ON v.journey_id = j.id AND v.version = j.current_version
"""


@router.get("", response_model=list[JourneyPublic])
async def list_journeys(pool: PoolDep) -> list[JourneyPublic]:
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
        raise ApiError(404, "not_found", f"no active journey {journey_id!r}")
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
        await start_run(
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
        status="running",
        created=True,
    )


@router.post("", response_model=JourneyPublic)
async def publish_journey(pool: PoolDep, definition: dict[str, Any] = Body(...)) -> JourneyPublic:
    """Validate and publish a definition as a new immutable version (unchanged: same version)."""
    try:
        defn = parse_definition(definition)
    except DefinitionError as err:
        raise ApiError(400, "invalid_definition", str(err)) from None
    await publish(pool, defn)
    return await get_journey(defn.id, pool)
