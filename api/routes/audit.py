"""The audit log (admin scope), newest first, paged with `before`."""

from __future__ import annotations

from fastapi import APIRouter, Query

from api.deps import AdminDep, PoolDep
from models.public import BigInt
from store.audit import AuditPage, page

router = APIRouter(prefix="/v1/audit", tags=["audit"], dependencies=[AdminDep])


@router.get("", response_model=AuditPage)
async def index(
    pool: PoolDep,
    limit: int = Query(default=50, ge=1, le=500),
    before: BigInt | None = Query(default=None, description="`next_before` of the previous page"),
    action: str | None = Query(
        default=None, description="e.g. `POST /v1/journeys/{journey_id}/publish`, `key.create`"
    ),
    target: str | None = Query(default=None, description="any target value: a journey id, ..."),
    key_id: str | None = Query(default=None, description="who: a key id, env:admin, cli:<user>"),
) -> AuditPage:
    return await page(pool, limit=limit, before=before, action=action, target=target, key_id=key_id)
