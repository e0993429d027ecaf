"""Consent (subscriptions per channel and topic) and the suppression list (admin key)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from api.deps import AdminDep, PoolDep
from api.errors import ApiError
from store import feedback
from store.feedback import normalize_address
from store.profiles import find_customer

router = APIRouter(tags=["contact"], dependencies=[AdminDep])

Channel = Literal["outbox", "email", "sms", "push", "webhook", "in_app"]


class SubscriptionPublic(BaseModel):
    channel: Channel
    topic: str = Field(
        default="marketing",
        pattern=r"^(\*|[a-z0-9][a-z0-9_\-]*)$",
        max_length=64,
        description="a send step's topic, or `*`: every topic of the channel (an SMS STOP "
        "unsubscribes `*`; unsubscribed there blocks the whole channel)",
    )
    status: Literal["subscribed", "unsubscribed"]
    source: str | None = Field(default="api", max_length=64)


# Reasons a suppression can be added with (by hand or by a provider's report).
AddedReason = Literal["hard_bounce", "complaint", "stop", "manual"]
# ...and the ones only an erasure writes, on hashed addresses (store.erasure).
KeptReason = Literal["opted_out", "unsubscribed", "regulation"]


class SuppressionCreate(BaseModel):
    channel: Channel
    address: str = Field(min_length=1, max_length=512)
    reason: AddedReason = Field(
        default="manual", description="`stop`: the number texted STOP (a START lifts it)"
    )


class SuppressionPublic(BaseModel):
    channel: Channel
    address: str = Field(
        description="normalised address, or `sha256:<hex>` kept for an erased customer"
    )
    reason: AddedReason | KeptReason = Field(
        description="`stop`: the number texted STOP (a START lifts it). Kept by an erasure "
        "(hashed): `opted_out` (a whole-channel opt-out), `unsubscribed` (a topic opt-out: "
        "blocks marketing sends only), `regulation` (a Segment SUPPRESS)"
    )
    created_at: datetime | None = None


async def _cid(pool: PoolDep, ref: str) -> str:
    cid = await find_customer(pool, ref)
    if cid is None:
        raise ApiError(404, "not_found", f"no customer {ref!r}")
    return cid


@router.get("/v1/customers/{ref}/subscriptions", response_model=list[SubscriptionPublic])
async def list_subscriptions(ref: str, pool: PoolDep) -> list[SubscriptionPublic]:
    """Explicit choices only; a channel/topic not listed follows CONSENT_DEFAULT."""
    rows = await pool.fetch(
        "SELECT channel, topic, status, source FROM subscriptions WHERE customer_id = $1 "
        "ORDER BY channel, topic",
        await _cid(pool, ref),
    )
    return [SubscriptionPublic.model_validate(dict(r)) for r in rows]


@router.put("/v1/customers/{ref}/subscriptions", response_model=SubscriptionPublic)
async def set_subscription(ref: str, body: SubscriptionPublic, pool: PoolDep) -> SubscriptionPublic:
    """Opt in or out; the very next send on that channel and topic honours it. Opting out
    emits an `Unsubscribed` event."""
    cid = await _cid(pool, ref)
    async with pool.acquire() as conn, conn.transaction():
        await feedback.set_subscription(
            conn, cid, body.channel, body.topic, body.status, body.source
        )
    return body


@router.get("/v1/suppressions", response_model=list[SuppressionPublic])
async def list_suppressions(
    pool: PoolDep, channel: Channel | None = None
) -> list[SuppressionPublic]:
    rows = await pool.fetch(
        "SELECT * FROM suppressions WHERE ($1::text IS NULL OR channel = $1) "
        "ORDER BY created_at DESC LIMIT 1000",
        channel,
    )
    return [SuppressionPublic.model_validate(dict(r)) for r in rows]


@router.post("/v1/suppressions", response_model=SuppressionPublic, status_code=201)
async def add_suppression(body: SuppressionCreate, pool: PoolDep) -> SuppressionPublic:
    if not normalize_address(body.channel, body.address):
        raise ApiError(400, "invalid_request", f"address: not an address on {body.channel}")
    row = await pool.fetchrow(
        "INSERT INTO suppressions (channel, address, reason) VALUES ($1, $2, $3) "
        "ON CONFLICT (channel, address) DO UPDATE SET reason = $3 RETURNING *",
        body.channel,
        normalize_address(body.channel, body.address),
        body.reason,
    )
    return SuppressionPublic.model_validate(dict(row))


@router.delete("/v1/suppressions/{channel}/{address}", status_code=204)
async def remove_suppression(channel: Channel, address: str, pool: PoolDep) -> Response:
    """Lift it: the plain row and the hashed one an erasure kept, whatever their reason.
    `address` is the address, or a hashed key as the list shows it."""
    if not await feedback.remove_suppression(pool, channel, address):
        raise ApiError(404, "not_found", f"{address!r} is not suppressed on {channel}")
    return Response(status_code=204)
