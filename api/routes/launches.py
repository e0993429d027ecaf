"""Audience launches and scheduled launches (admin key)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, model_validator
from temporalio.client import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleCalendarSpec,
    ScheduleRange,
    ScheduleSpec,
    ScheduleState,
)
from temporalio.service import RPCError, RPCStatusCode

from api.deps import AdminDep, PoolDep, SettingsDep, TemporalDep
from api.errors import ApiError
from models.audience import AudienceError, compile_audience
from models.conditions import Condition
from models.definition_errors import explain
from models.runtime import LaunchInput, LaunchProgress
from store.journeys import active_definitions

router = APIRouter(tags=["launches"], dependencies=[AdminDep])
_CONDITION = TypeAdapter(Condition)


class LaunchRequest(BaseModel):
    audience: dict[str, Any] | None = Field(
        default=None, description="condition over profile.traits.* / profile.stats.events.*"
    )
    rate_per_second: float = Field(default=50.0, gt=0, le=10_000)
    page_size: int = Field(default=200, ge=1, le=5_000)


class LaunchPublic(BaseModel):
    id: str
    journey_id: str
    status: str
    enrolled: int
    skipped: int
    cursor: str | None
    rate_per_second: float
    page_size: int
    created_at: datetime
    finished_at: datetime | None
    error: str | None = Field(default=None, description="why the launch failed (`failed`)")
    failed_sends: int = Field(
        default=0, description="sends to the customers it enrolled that failed (so far)"
    )
    failed_runs: int = Field(
        default=0, description="its runs that ended completed_with_failures or failed"
    )


# What happened to the runs a launch enrolled: their enrollment ids end in `:launch:<id>`.
_LAUNCH_FAILURES = """
WITH runs AS (
  SELECT workflow_id, status, started_at FROM journey_runs
  WHERE journey_id = $2 AND enrollment_id LIKE '%:launch:' || $1
)
SELECT (SELECT count(*) FROM runs WHERE status IN ('completed_with_failures', 'failed'))
         AS failed_runs,
       (SELECT count(*) FROM messages m JOIN runs r ON r.workflow_id = m.workflow_id
        WHERE m.journey_id = $2 AND m.status IN ('failed', 'bounced')
          AND m.created_at >= r.started_at) AS failed_sends
"""


class ScheduleRequest(LaunchRequest):
    cron: str | None = Field(default=None, description="recurring: a cron expression (UTC)")
    at: datetime | None = Field(default=None, description="once: at this time")

    @model_validator(mode="after")
    def _one(self) -> ScheduleRequest:
        if (self.cron is None) == (self.at is None):
            raise ValueError("give exactly one of cron, at")
        return self


class SchedulePublic(BaseModel):
    id: str
    journey_id: str | None
    paused: bool
    next_runs: list[datetime]
    recent_launches: list[str]


async def _check(pool: PoolDep, journey_id: str, audience: dict[str, Any] | None) -> None:
    if journey_id not in {d.id for d in await active_definitions(pool)}:
        raise ApiError(404, "not_found", f"no active journey {journey_id!r}")
    try:
        compile_audience(_CONDITION.validate_python(audience) if audience else None)
    except ValidationError as err:  # said as definition errors are, under `audience`
        problems = explain(err, {"audience": audience}, prefix=("audience",))
        raise ApiError(400, "invalid_audience", "; ".join(map(str, problems))) from None
    except (AudienceError, ValueError) as err:
        raise ApiError(400, "invalid_audience", f"audience: {err}") from None


@router.post("/v1/journeys/{journey_id}/launches", response_model=LaunchPublic, status_code=201)
async def launch(
    journey_id: str,
    body: LaunchRequest,
    pool: PoolDep,
    temporal: TemporalDep,
    settings: SettingsDep,
) -> LaunchPublic:
    """Enrol every customer matching `audience`, at `rate_per_second`, as a durable workflow."""
    await _check(pool, journey_id, body.audience)
    launch_id = uuid.uuid4().hex[:16]
    row = await pool.fetchrow(
        "INSERT INTO launches (id, journey_id, audience, rate_per_second, page_size, status) "
        "VALUES ($1, $2, $3, $4, $5, 'running') RETURNING *",
        launch_id,
        journey_id,
        body.audience,
        body.rate_per_second,
        body.page_size,
    )
    await temporal.start_workflow(
        "LaunchWorkflow",
        LaunchInput(launch_id=launch_id, journey_id=journey_id, **body.model_dump()),
        id=f"launch-{launch_id}",
        task_queue=settings.temporal_task_queue,
        static_summary=f"audience launch of {journey_id}",
    )
    return LaunchPublic.model_validate(dict(row))


@router.get("/v1/launches/{launch_id}", response_model=LaunchPublic)
async def get_launch(launch_id: str, pool: PoolDep, temporal: TemporalDep) -> LaunchPublic:
    row = await pool.fetchrow("SELECT * FROM launches WHERE id = $1", launch_id)
    if row is None:
        raise ApiError(404, "not_found", f"no launch {launch_id!r}")
    out = LaunchPublic.model_validate(dict(row))
    figures = await pool.fetchrow(_LAUNCH_FAILURES, launch_id, out.journey_id)
    out = out.model_copy(update=dict(figures))
    if out.status == "running":
        try:  # live figures between two recorded pages
            live = await temporal.get_workflow_handle(f"launch-{launch_id}").query(
                "progress", result_type=LaunchProgress
            )
            out = out.model_copy(
                update={"enrolled": live.enrolled, "skipped": live.skipped, "cursor": live.cursor}
            )
        except RPCError:
            pass  # the stored row stands
    return out


@router.post("/v1/launches/{launch_id}/cancel", response_model=LaunchPublic)
async def cancel_launch(launch_id: str, pool: PoolDep, temporal: TemporalDep) -> LaunchPublic:
    """Stops after the page being enrolled; those enrolled stay enrolled."""
    if await pool.fetchval("SELECT 1 FROM launches WHERE id = $1", launch_id) is None:
        raise ApiError(404, "not_found", f"no launch {launch_id!r}")
    try:
        await temporal.get_workflow_handle(f"launch-{launch_id}").signal("cancel")
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
    return await get_launch(launch_id, pool, temporal)


@router.post("/v1/journeys/{journey_id}/schedules", response_model=SchedulePublic, status_code=201)
async def create_schedule(
    journey_id: str,
    body: ScheduleRequest,
    pool: PoolDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    response: Response,
) -> SchedulePublic:
    """A launch once `at` a time, or on a `cron`, as a Temporal Schedule."""
    await _check(pool, journey_id, body.audience)
    schedule_id = f"launch-{journey_id}-{uuid.uuid4().hex[:8]}"
    if body.cron is not None:
        spec = ScheduleSpec(cron_expressions=[body.cron])
        state = ScheduleState()
    else:
        assert body.at is not None
        at = body.at
        spec = ScheduleSpec(
            calendars=[
                ScheduleCalendarSpec(
                    second=[ScheduleRange(at.second)],
                    minute=[ScheduleRange(at.minute)],
                    hour=[ScheduleRange(at.hour)],
                    day_of_month=[ScheduleRange(at.day)],
                    month=[ScheduleRange(at.month)],
                    year=[ScheduleRange(at.year)],
                )
            ]
        )
        state = ScheduleState(limited_actions=True, remaining_actions=1)
    launch_input = LaunchInput(
        journey_id=journey_id, schedule_id=schedule_id, **body.model_dump(exclude={"cron", "at"})
    )
    try:
        handle = await temporal.create_schedule(
            schedule_id,
            Schedule(
                action=ScheduleActionStartWorkflow(
                    "LaunchWorkflow",
                    launch_input,
                    id=f"{schedule_id}-run",
                    task_queue=settings.temporal_task_queue,
                ),
                spec=spec,
                state=state,
            ),
            memo={"journey_id": journey_id},
        )
    except RPCError as err:
        raise ApiError(400, "invalid_schedule", f"cron: {err.message}") from None
    return await _describe(handle.id, temporal)


async def _describe(schedule_id: str, temporal: TemporalDep) -> SchedulePublic:
    try:
        desc = await temporal.get_schedule_handle(schedule_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise ApiError(404, "not_found", f"no schedule {schedule_id!r}") from None
        raise
    memo = await desc.memo()
    return SchedulePublic(
        id=schedule_id,
        journey_id=memo.get("journey_id"),
        paused=desc.schedule.state.paused,
        next_runs=list(desc.info.next_action_times),
        recent_launches=[a.action.workflow_id for a in desc.info.recent_actions],
    )


@router.get("/v1/schedules", response_model=list[SchedulePublic])
async def list_schedules(temporal: TemporalDep) -> list[SchedulePublic]:
    return [
        await _describe(s.id, temporal)
        async for s in await temporal.list_schedules()
        if s.id.startswith("launch-")
    ]


@router.get("/v1/schedules/{schedule_id}", response_model=SchedulePublic)
async def get_schedule(schedule_id: str, temporal: TemporalDep) -> SchedulePublic:
    return await _describe(schedule_id, temporal)


@router.post("/v1/schedules/{schedule_id}/pause", response_model=SchedulePublic)
async def pause_schedule(schedule_id: str, temporal: TemporalDep) -> SchedulePublic:
    await _describe(schedule_id, temporal)
    await temporal.get_schedule_handle(schedule_id).pause(note="paused via API")
    return await _describe(schedule_id, temporal)


@router.post("/v1/schedules/{schedule_id}/unpause", response_model=SchedulePublic)
async def unpause_schedule(schedule_id: str, temporal: TemporalDep) -> SchedulePublic:
    await _describe(schedule_id, temporal)
    await temporal.get_schedule_handle(schedule_id).unpause(note="unpaused via API")
    return await _describe(schedule_id, temporal)


@router.delete("/v1/schedules/{schedule_id}", status_code=204)
async def delete_schedule(schedule_id: str, temporal: TemporalDep) -> Response:
    await _describe(schedule_id, temporal)
    await temporal.get_schedule_handle(schedule_id).delete()
    return Response(status_code=204)
