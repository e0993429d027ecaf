"""Dead letters (admin key): events the router set aside, their errors, and replay."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query

from api.deps import AdminDep, PoolDep
from api.errors import ApiError
from models.public import BigInt
from models.tables import DeadLetterPage, DeadLetterPublic
from store.events import replay_dead_letter

router = APIRouter(prefix="/v1/dead-letters", tags=["dead letters"], dependencies=[AdminDep])

_SELECT = """
SELECT d.id, d.event_id, d.message_id, d.error, d.error_type, d.failures, d.status,
       d.created_at, d.updated_at, d.replayed_at,
       e.type, e.event, e.user_id, e.anonymous_id, e.timestamp::text AS timestamp, e.payload
FROM dead_letters d JOIN events e ON e.id = d.event_id
"""


def _public(row: Any) -> DeadLetterPublic:
    return DeadLetterPublic.model_validate(dict(row))


@router.get("", response_model=DeadLetterPage)
async def list_dead_letters(
    pool: PoolDep,
    status: Literal["open", "replayed"] | None = None,
    limit: int = Query(100, ge=1, le=1000),
    before: BigInt | None = None,
) -> DeadLetterPage:
    """Newest first; `status` filters (`open`: still set aside); page with `before`."""
    rows = await pool.fetch(
        _SELECT + "WHERE ($1::text IS NULL OR d.status = $1) AND ($2::bigint IS NULL OR d.id < $2) "
        "ORDER BY d.id DESC LIMIT $3",
        status,
        before,
        limit,
    )
    items = [_public(r) for r in rows]
    return DeadLetterPage(items=items, next_before=items[-1].id if len(items) == limit else None)


@router.get("/{letter_id}", response_model=DeadLetterPublic)
async def get_dead_letter(letter_id: BigInt, pool: PoolDep) -> DeadLetterPublic:
    row = await pool.fetchrow(_SELECT + "WHERE d.id = $1", letter_id)
    if row is None:
        raise ApiError(404, "not_found", f"id: no dead letter {letter_id}")
    return _public(row)


@router.post("/{letter_id}/replay", response_model=DeadLetterPublic)
async def replay(letter_id: BigInt, pool: PoolDep) -> DeadLetterPublic:
    """Put the event back in the outbox (after a fix): the router routes it like any other,
    and sets it aside again, reopening this row, if it still fails."""
    async with pool.acquire() as conn:
        if not await replay_dead_letter(conn, letter_id):
            current = await conn.fetchval(
                "SELECT status FROM dead_letters WHERE id = $1", letter_id
            )
            if current is None:
                raise ApiError(404, "not_found", f"id: no dead letter {letter_id}")
            raise ApiError(409, "invalid_state", f"id: dead letter {letter_id} is {current}")
    return await get_dead_letter(letter_id, pool)
