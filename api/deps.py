"""Request dependencies: the pool, the Temporal client, write-key and admin-key auth."""

from __future__ import annotations

import base64
import hmac
from typing import Annotated

import asyncpg
from fastapi import Depends, Request
from temporalio.client import Client

from activities.channels import Channel
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
    if not any(hmac.compare_digest(key, k) for k in settings.write_keys):
        raise ApiError(401, "unauthorized", "invalid write key")


def require_admin(request: Request, settings: SettingsDep) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    key = value.strip() if scheme.lower() == "bearer" else basic_user(request)
    if not key or not hmac.compare_digest(key, settings.journeys_admin_key):
        raise ApiError(401, "unauthorized", "admin key required: `Authorization: Bearer <key>`")


AdminDep = Depends(require_admin)
