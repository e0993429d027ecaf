"""The in-app inbox: messages sent on the `in_app` channel, read by the app's backend (admin
key), newest first, and marked read. Reads count as engagement for `channel: best`."""

from __future__ import annotations

from fastapi import APIRouter, Query

from api.deps import AdminDep, PoolDep
from api.errors import ApiError
from models.public import BigInt, InboxItem, InboxPage
from store.profiles import find_customer

router = APIRouter(prefix="/v1/customers", tags=["inbox"], dependencies=[AdminDep])

_ITEM = "id, subject, body, html, journey_id, created_at, read_at"


async def _customer_id(pool: PoolDep, ref: str) -> str:
    cid = await find_customer(pool, ref)
    if cid is None:
        raise ApiError(404, "not_found", f"no customer {ref!r}")
    return cid


@router.get("/{ref}/inbox", response_model=InboxPage)
async def get_inbox(
    ref: str,
    pool: PoolDep,
    limit: int = Query(50, ge=1, le=500),
    before: BigInt | None = Query(None, description="page: items with id below this"),
    unread_only: bool = False,
) -> InboxPage:
    cid = await _customer_id(pool, ref)
    rows = await pool.fetch(
        f"SELECT {_ITEM} FROM messages WHERE customer_id = $1 AND channel = 'in_app' "
        "AND status = 'sent' AND NOT test AND ($2::bigint IS NULL OR id < $2) "
        "AND (NOT $3 OR read_at IS NULL) ORDER BY id DESC LIMIT $4",
        cid,
        before,
        unread_only,
        limit,
    )
    unread = await pool.fetchval(
        "SELECT count(*) FROM messages WHERE customer_id = $1 AND channel = 'in_app' "
        "AND status = 'sent' AND NOT test AND read_at IS NULL",
        cid,
    )
    items = [InboxItem.model_validate(dict(r)) for r in rows]
    return InboxPage(
        items=items, unread=unread, next_before=items[-1].id if len(items) == limit else None
    )


@router.post("/{ref}/inbox/{message_id}/read", response_model=InboxItem)
async def mark_read(ref: str, message_id: BigInt, pool: PoolDep) -> InboxItem:
    """Idempotent: the first read time is kept."""
    cid = await _customer_id(pool, ref)
    row = await pool.fetchrow(
        "UPDATE messages SET read_at = coalesce(read_at, now()) WHERE id = $1 "
        f"AND customer_id = $2 AND channel = 'in_app' AND status = 'sent' RETURNING {_ITEM}",
        message_id,
        cid,
    )
    if row is None:
        raise ApiError(404, "not_found", f"message_id: no in-app message {message_id} for {ref!r}")
    return InboxItem.model_validate(dict(row))
