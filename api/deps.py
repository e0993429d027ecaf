"""Request dependencies: the pool, the Temporal client, the caller's key.

Keys and scopes are checked once for every route by `api.access.AccessMiddleware` (the table is
`api.scopes.ROUTE_SCOPES`); routes never check keys themselves, except the event routes for a
`writeKey` sent in the body (`check_write_key`, same keyring and scope).
"""

from __future__ import annotations

import base64
from typing import Annotated

import asyncpg
from fastapi import Depends, Request
from temporalio.client import Client

from activities.channels import Channel
from api.access import PRINCIPAL, Keyring, Principal, authorize, current_keyring
from api.errors import ApiError
from core.settings import Settings


def get_pool(request: Request) -> asyncpg.Pool:
    return request.app.state.pool


def get_temporal(request: Request) -> Client:
    return request.app.state.temporal


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_channels(request: Request) -> dict[str, Channel]:
    return request.app.state.channels


PoolDep = Annotated[asyncpg.Pool, Depends(get_pool)]
ChannelsDep = Annotated[dict[str, Channel], Depends(get_channels)]
TemporalDep = Annotated[Client, Depends(get_temporal)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def basic_user(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip()).decode()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(401, "unauthorized", "malformed Basic authorization header") from None
    return decoded.partition(":")[0]


def check_write_key(settings: Settings, header_key: str | None, body_key: object) -> None:
    """An event request's key (HTTP Basic `KEY:` or `writeKey`) must hold the `ingest` scope:
    a bootstrap write key (JOURNEYS_WRITE_KEY) or a stored key with that scope."""
    key = header_key or (body_key if isinstance(body_key, str) else None)
    if not key:
        raise ApiError(401, "unauthorized", "write key required: HTTP Basic `KEY:` or `writeKey`")
    keyring = current_keyring.get() or Keyring(settings)
    principal = keyring.authenticate(key)
    if principal is None:
        raise ApiError(401, "unauthorized", "invalid write key")
    authorize(principal, "ingest", "events")


def require_authorized(request: Request) -> None:
    """Fails closed if a route is reached without AccessMiddleware having authorized a key
    (a public route never depends on this)."""
    if request.scope.get(PRINCIPAL) is None:
        raise ApiError(401, "unauthorized", "an API key is required: `Authorization: Bearer <key>`")


def get_principal(request: Request) -> Principal:
    principal = request.scope.get(PRINCIPAL)
    if principal is None:
        raise ApiError(401, "unauthorized", "an API key is required: `Authorization: Bearer <key>`")
    return principal


# Kept for the route modules that declare it: the scope itself is checked by the middleware.
require_admin = require_authorized
AdminDep = Depends(require_authorized)
PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused past `limit` bytes: before reading when Content-Length says
    so, and as soon as the stream passes it otherwise (chunked, or a Content-Length that lied)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError(400, "invalid_request", "Content-Length: not a number")
        if int(declared) > limit:
            raise ApiError(400, "too_large", f"body: exceeds {limit // 1024} KB")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(400, "too_large", f"body: exceeds {limit // 1024} KB")
    return bytes(raw)
