"""API keys: created, listed, revoked, and loaded for authentication. Owns `api_keys`.

A token is `jk_<id>_<secret>`: the id (12 hex characters) is visible in lists, logs and the
audit log; the secret is 256 random bits. Only SHA-256(token) is stored (a fast hash is enough
for a token this random; nothing to brute-force), compared in constant time. The token is
returned once, by `create_key`. Every change NOTIFYs `api_keys_changed` so that each API process
reloads its keys at once (`api.access.Keyring`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from pydantic import BaseModel

from api.scopes import SCOPES, Scope
from store import audit

TOKEN_PREFIX = "jk_"
CHANGED = "api_keys_changed"
_TOKEN = re.compile(r"jk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}\Z")


class InvalidKeyRequest(ValueError):
    """A key request that cannot be honoured; the message names the field."""


class ApiKeyPublic(BaseModel):
    id: str
    name: str
    scopes: list[str]
    created_by: str
    created_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None


class CreatedApiKey(ApiKeyPublic):
    token: str


@dataclass(frozen=True)
class StoredKey:
    id: str
    secret_hash: str
    scopes: frozenset[str]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def key_id_of(token: str) -> str | None:
    """The id of a well-formed token, else None (not one of ours)."""
    match = _TOKEN.match(token)
    return match.group(1) if match else None


def matches(stored: StoredKey, token: str) -> bool:
    return hmac.compare_digest(stored.secret_hash, hash_token(token))


def _scopes(scopes: Iterable[str]) -> list[Scope]:
    wanted = list(dict.fromkeys(scopes))
    if not wanted:
        raise InvalidKeyRequest(f"scopes: at least one of {', '.join(SCOPES)}")
    unknown = [s for s in wanted if s not in SCOPES]
    if unknown:
        raise InvalidKeyRequest(f"scopes: unknown {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    return [s for s in SCOPES if s in wanted]


async def create_key(
    pool: asyncpg.Pool, *, name: str, scopes: Iterable[str], created_by: str
) -> CreatedApiKey:
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidKeyRequest("name: 1 to 200 characters")
    ordered = _scopes(scopes)
    key_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            INSERT INTO api_keys (id, name, scopes, secret_hash, created_by)
            VALUES ($1, $2, $3, $4, $5) RETURNING *
            """,
            key_id,
            name,
            ordered,
            hash_token(token),
            created_by,
        )
        await audit.append(
            conn,
            key_id=created_by,
            action="key.create",
            target={"key_id": key_id},
            detail={"name": name, "scopes": ordered},
        )
        await conn.execute("SELECT pg_notify($1, $2)", CHANGED, key_id)
    return CreatedApiKey(**_public(row), token=token)


async def revoke_key(pool: asyncpg.Pool, key_id: str, *, revoked_by: str) -> ApiKeyPublic | None:
    """Revoke a key (None = no such key). Revoking twice keeps the first revocation."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            UPDATE api_keys SET revoked_at = now(), revoked_by = $2
            WHERE id = $1 AND revoked_at IS NULL RETURNING *
            """,
            key_id,
            revoked_by,
        )
        if row is None:
            row = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
            return None if row is None else ApiKeyPublic(**_public(row))
        await audit.append(
            conn,
            key_id=revoked_by,
            action="key.revoke",
            target={"key_id": key_id},
            detail={"name": row["name"], "scopes": list(row["scopes"])},
        )
        await conn.execute("SELECT pg_notify($1, $2)", CHANGED, key_id)
    return ApiKeyPublic(**_public(row))


async def list_keys(pool: asyncpg.Pool, *, include_revoked: bool = False) -> list[ApiKeyPublic]:
    rows = await pool.fetch(
        "SELECT * FROM api_keys WHERE $1 OR revoked_at IS NULL ORDER BY created_at, id",
        include_revoked,
    )
    return [ApiKeyPublic(**_public(r)) for r in rows]


async def active_keys(pool: asyncpg.Pool) -> dict[str, StoredKey]:
    rows = await pool.fetch("SELECT id, secret_hash, scopes FROM api_keys WHERE revoked_at IS NULL")
    return {r["id"]: StoredKey(r["id"], r["secret_hash"], frozenset(r["scopes"])) for r in rows}


def _public(row: asyncpg.Record) -> dict[str, object]:
    data = dict(row)
    data.pop("secret_hash")
    data["scopes"] = list(data["scopes"])
    return data
