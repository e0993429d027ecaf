"""Journey definitions (admin key): list, get, publish a new version."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body

from api.deps import AdminDep, PoolDep
from api.errors import ApiError
from models.journey import JourneyDefinition
from models.public import JourneyPublic
from store.journeys import DefinitionError, parse_definition, publish

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


@router.post("", response_model=JourneyPublic)
async def publish_journey(pool: PoolDep, definition: dict[str, Any] = Body(...)) -> JourneyPublic:
    """Validate and publish a definition as a new immutable version (unchanged: same version)."""
    try:
        defn = parse_definition(definition)
    except DefinitionError as err:
        raise ApiError(400, "invalid_definition", str(err)) from None
    await publish(pool, defn)
    return await get_journey(defn.id, pool)
