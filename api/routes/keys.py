"""API keys (admin scope): create (the token is shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from api.deps import AdminDep, PoolDep, PrincipalDep
from api.errors import ApiError
from store.api_keys import (
    ApiKeyPublic,
    CreatedApiKey,
    InvalidKeyRequest,
    create_key,
    list_keys,
    revoke_key,
)

router = APIRouter(prefix="/v1/keys", tags=["keys"], dependencies=[AdminDep])


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="what the key is for")
    scopes: list[str] = Field(
        min_length=1, description="any of ingest, read, manage, operate, admin"
    )


@router.post("", response_model=CreatedApiKey, status_code=201)
async def create(
    body: KeyCreate, request: Request, pool: PoolDep, principal: PrincipalDep
) -> CreatedApiKey:
    """A new key; `token` is in this answer only (only its hash is stored)."""
    try:
        created = await create_key(
            pool, name=body.name, scopes=body.scopes, created_by=principal.key_id
        )
    except InvalidKeyRequest as err:
        raise ApiError(400, "invalid_request", str(err)) from None
    await request.app.state.keyring.reload(pool)
    return created


@router.get("", response_model=list[ApiKeyPublic])
async def index(pool: PoolDep, include_revoked: bool = Query(default=False)) -> list[ApiKeyPublic]:
    return await list_keys(pool, include_revoked=include_revoked)


@router.delete("/{key_id}", response_model=ApiKeyPublic)
async def revoke(
    key_id: str, request: Request, pool: PoolDep, principal: PrincipalDep
) -> ApiKeyPublic:
    """The key stops working at once on this API process, within moments on the others."""
    revoked = await revoke_key(pool, key_id, revoked_by=principal.key_id)
    if revoked is None:
        raise ApiError(404, "not_found", f"key_id: no key {key_id!r}")
    await request.app.state.keyring.reload(pool)
    return revoked
