"""Provider callbacks: delivery, bounces and complaints, SMS status and inbound SMS keywords.

No admin key: each request is verified by its signature instead. The generic callback is signed
like our outgoing webhooks (`Journeys-Signature`, HMAC-SHA256 with WEBHOOK_SIGNING_SECRET, at
most WEBHOOK_TOLERANCE_SECONDS old); the Twilio-style SMS callbacks carry `X-Twilio-Signature`
(HMAC-SHA1 with SMS_AUTH_TOKEN over the URL Twilio called and the form fields). That URL is
rebuilt from PUBLIC_URL + the request path, not from the request as this process sees it:
behind a proxy or load balancer the host and scheme differ, and Twilio signed the public one.
So configure the provider with `{PUBLIC_URL}/v1/providers/sms/status` and `.../sms/inbound`.
"""

from __future__ import annotations

import json
from typing import Literal
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from activities.signing import SIGNATURE_HEADER, BadSignature, verify_signature, verify_twilio
from api.deps import PoolDep, SettingsDep
from api.errors import ApiError
from store.feedback import (
    BounceKind,
    customers_by_phone,
    find_by_provider_id,
    record_bounce,
    record_delivered,
    resubscribe_channel,
    set_subscription,
)

router = APIRouter(prefix="/v1/providers", tags=["providers"])

Channel = Literal["email", "sms", "push", "webhook", "in_app", "outbox"]
MAX_BODY_BYTES = 1024 * 1024
MAX_EVENTS = 1000
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_WORDS = frozenset({"START", "UNSTOP", "YES"})
# Twilio error codes that mean the number itself cannot receive messages (invalid, not a
# mobile, unreachable/unknown handset, landline): a hard bounce. Anything else is soft.
PERMANENT_SMS_ERRORS = frozenset({"21211", "21614", "30003", "30005", "30006"})
_SOURCE = "sms_keyword"


class ProviderEvent(BaseModel):
    """One delivery fact from an email (or other) provider."""

    model_config = ConfigDict(extra="ignore")
    provider_id: str = Field(min_length=1, max_length=512)
    type: Literal["delivered", "bounced", "complained"]
    bounce: Literal["hard", "soft"] = "hard"
    reason: str | None = Field(default=None, max_length=1000)


class ProviderEventsResult(BaseModel):
    received: int
    applied: int
    ignored: int = Field(description="facts about messages we do not know (not an error)")


async def _raw(request: Request) -> bytes:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(400, "too_large", f"request body exceeds {MAX_BODY_BYTES // 1024} KB")
    return raw


def _events(raw: bytes) -> list[ProviderEvent]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, "invalid_json", f"invalid JSON: {err}") from None
    items, prefix = ([body], "") if isinstance(body, dict) else (body, "[{}].")
    if not isinstance(items, list):
        raise ApiError(400, "invalid_request", "body: must be an object or an array of objects")
    if len(items) > MAX_EVENTS:
        raise ApiError(400, "invalid_request", f"body: {len(items)} events; limit is {MAX_EVENTS}")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(ProviderEvent.model_validate(item))
        except ValidationError as err:
            e = err.errors()[0]
            field = ".".join(str(x) for x in e["loc"]) or "body"
            raise ApiError(
                400, "invalid_request", f"{prefix.format(i)}{field}: {e['msg']}"
            ) from None
    return out


@router.post("/{channel}/events", response_model=ProviderEventsResult)
async def provider_events(
    channel: Channel, request: Request, pool: PoolDep, settings: SettingsDep
) -> ProviderEventsResult:
    """Delivered / bounced / complained, one object or an array, signed `Journeys-Signature`.

    Messages are found by `provider_id` (SMTP Message-ID, SMS sid, push name); unknown ones are
    counted as ignored. A hard bounce or a complaint suppresses the address."""
    raw = await _raw(request)
    try:
        verify_signature(
            settings.webhook_signing_secret,
            request.headers.get(SIGNATURE_HEADER),
            raw,
            tolerance=settings.webhook_tolerance_seconds,
        )
    except BadSignature as err:
        raise ApiError(401, "unauthorized", f"{SIGNATURE_HEADER}: {err}") from None
    events = _events(raw)
    applied = 0
    async with pool.acquire() as conn, conn.transaction():
        # One lock order for every batch, so two overlapping callbacks cannot deadlock.
        for e in sorted(events, key=lambda e: e.provider_id):
            msg = await find_by_provider_id(conn, channel, e.provider_id)
            if msg is None:
                continue
            applied += 1
            if e.type == "delivered":
                await record_delivered(conn, msg)
            else:
                kind: BounceKind = "complaint" if e.type == "complained" else e.bounce
                await record_bounce(conn, msg, kind, e.reason)
    return ProviderEventsResult(
        received=len(events), applied=applied, ignored=len(events) - applied
    )


async def _twilio_form(request: Request, settings: SettingsDep) -> dict[str, str]:
    raw = await _raw(request)
    try:
        params = dict(parse_qsl(raw.decode(), keep_blank_values=True))
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_request", "body: not form-encoded UTF-8") from None
    url = settings.public_url.rstrip("/") + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    try:
        verify_twilio(
            settings.sms_auth_token, request.headers.get("X-Twilio-Signature"), url, params
        )
    except BadSignature as err:
        raise ApiError(401, "unauthorized", f"X-Twilio-Signature: {err}") from None
    return params


def _required(params: dict[str, str], name: str) -> str:
    value = params.get(name, "").strip()
    if not value:
        raise ApiError(400, "invalid_request", f"{name}: required")
    return value


@router.post("/sms/status", response_model=ProviderEventsResult)
async def sms_status(
    request: Request, pool: PoolDep, settings: SettingsDep
) -> ProviderEventsResult:
    """Twilio-style status callback (form: MessageSid, MessageStatus, ErrorCode).

    `delivered` records delivery; `undelivered` / `failed` a bounce, hard for the error codes
    that mean the number cannot receive (PERMANENT_SMS_ERRORS), else soft. Other statuses
    (queued, sent, ...) change nothing."""
    params = await _twilio_form(request, settings)
    sid = _required(params, "MessageSid")
    status = _required(params, "MessageStatus").lower()
    async with pool.acquire() as conn, conn.transaction():
        msg = await find_by_provider_id(conn, "sms", sid)
        if msg is not None and status == "delivered":
            await record_delivered(conn, msg)
        elif msg is not None and status in ("undelivered", "failed"):
            code = params.get("ErrorCode", "").strip()
            kind: BounceKind = "hard" if code in PERMANENT_SMS_ERRORS else "soft"
            await record_bounce(conn, msg, kind, f"{status} {code}".strip())
    found = int(msg is not None)
    return ProviderEventsResult(received=1, applied=found, ignored=1 - found)


def _twiml(message: str | None) -> Response:
    reply = f"<Response><Message>{escape(message)}</Message></Response>" if message else ""
    return Response(
        f'<?xml version="1.0" encoding="UTF-8"?>{reply or "<Response/>"}',
        media_type="application/xml",
    )


@router.post("/sms/inbound", response_class=Response)
async def sms_inbound(request: Request, pool: PoolDep, settings: SettingsDep) -> Response:
    """Twilio-style inbound SMS (form: From, To, Body, MessageSid); answers TwiML.

    The whole body, trimmed and case-insensitive, is the keyword: STOP, STOPALL, UNSUBSCRIBE,
    CANCEL, END, QUIT unsubscribe every customer with that `phone` from all SMS (topic `*`);
    START, UNSTOP, YES subscribe them again, topic rows included. Anything else changes
    nothing."""
    params = await _twilio_form(request, settings)
    phone = _required(params, "From")
    word = params.get("Body", "").strip().upper()
    if word not in STOP_WORDS | START_WORDS:
        return _twiml(None)
    async with pool.acquire() as conn, conn.transaction():
        for cid in await customers_by_phone(conn, phone):
            if word in STOP_WORDS:
                await set_subscription(conn, cid, "sms", "*", "unsubscribed", _SOURCE)
            else:
                await resubscribe_channel(conn, cid, "sms", _SOURCE)
    if word in STOP_WORDS:
        return _twiml(
            "You are unsubscribed and will receive no more messages. Reply START to resubscribe."
        )
    return _twiml("You are subscribed again. Reply STOP to unsubscribe.")
