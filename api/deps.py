"""Request dependencies: the pool, the Temporal client, write-key and admin-key auth."""

from __future__ import annotations

import base64
from typing import Annotated

import asyncpg
from fastapi import Depends, Request
from temporalio.client import Client

from activities.channels import Channel
from activities.signing import same
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
    key = header_key or (body_key if isinstance(body_key, str) else None)
    if not key:
        raise ApiError(401, "unauthorized", "write key required: HTTP Basic `KEY:` or `writeKey`")
    if not any(same(k, key) for k in settings.write_keys):
        raise ApiError(401, "unauthorized", "invalid write key")


def require_admin(request: Request, settings: SettingsDep) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    key = value.strip() if scheme.lower() == "bearer" else basic_user(request)
    if not key or not same(settings.journeys_admin_key, key):
        raise ApiError(401, "unauthorized", "admin key required: `Authorization: Bearer <key>`")


AdminDep = Depends(require_admin)


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
