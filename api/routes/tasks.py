"""Hand-off tasks (admin key): what humans are asked to do, and closing them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from temporalio.service import RPCError, RPCStatusCode

from api.deps import AdminDep, PoolDep, TemporalDep
from api.errors import ApiError
from models.public import BigInt
from models.runtime import TaskClosed

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], dependencies=[AdminDep])


class TaskPublic(BaseModel):
    id: int
    queue: str
    title: str
    details: dict[str, Any]
    status: str
    outcome: str | None
    closed_by: str | None
    customer_id: str
    journey_id: str
    step_id: str
    workflow_id: str
    created_at: datetime
    closed_at: datetime | None


class CloseTask(BaseModel):
    outcome: str = Field(default="done", max_length=200, description="readable by conditions")
    closed_by: str | None = Field(default=None, max_length=256)


@router.get("", response_model=list[TaskPublic])
async def list_tasks(
    pool: PoolDep,
    status: Literal["open", "closed"] | None = "open",
    queue: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
) -> list[TaskPublic]:
    rows = await pool.fetch(
        "SELECT * FROM tasks WHERE ($1::text IS NULL OR status = $1) "
        "AND ($2::text IS NULL OR queue = $2) ORDER BY id LIMIT $3",
        status,
        queue,
        limit,
    )
    return [TaskPublic.model_validate(dict(r)) for r in rows]


@router.get("/{task_id}", response_model=TaskPublic)
async def get_task(task_id: BigInt, pool: PoolDep) -> TaskPublic:
    row = await pool.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)
    if row is None:
        raise ApiError(404, "not_found", f"no task {task_id}")
    return TaskPublic.model_validate(dict(row))


@router.post("/{task_id}/close", response_model=TaskPublic)
async def close_task(
    task_id: BigInt, body: CloseTask, pool: PoolDep, temporal: TemporalDep
) -> TaskPublic:
    """Close once; the waiting run (if any) resumes with `outcome`. Closing again is a no-op."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT * FROM tasks WHERE id = $1 FOR UPDATE", task_id)
        if row is None:
            raise ApiError(404, "not_found", f"no task {task_id}")
        if row["status"] == "closed":
            return TaskPublic.model_validate(dict(row))
        try:
            # Signalled inside the transaction: if Temporal is unreachable nothing changes.
            await temporal.get_workflow_handle(row["workflow_id"]).signal(
                "task_closed", TaskClosed(task_id=task_id, outcome=body.outcome)
            )
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise ApiError(503, "unavailable", f"could not resume the run: {err}") from None
        row = await conn.fetchrow(
            "UPDATE tasks SET status = 'closed', outcome = $2, closed_by = $3, closed_at = now() "
            "WHERE id = $1 RETURNING *",
            task_id,
            body.outcome,
            body.closed_by,
        )
    return TaskPublic.model_validate(dict(row))
