"""Provider callbacks: delivery, bounces and complaints, SMS status and inbound SMS keywords.

No admin key: each request is verified by its signature instead, and an endpoint nobody
configured a secret for is off (404), so no default secret is ever trusted. The generic callback
is signed in the scheme of our outgoing webhooks (`Journeys-Signature`, HMAC-SHA256, at most
WEBHOOK_TOLERANCE_SECONDS old) but with its own PROVIDER_CALLBACK_SECRET: with the outgoing
secret, any receiver of our webhooks could replay them here. The Twilio-style SMS callbacks
(on only with SMS_API_URL) carry `X-Twilio-Signature` (HMAC-SHA1 with SMS_AUTH_TOKEN over the
URL Twilio called, query string included, and the form fields). That URL is rebuilt from
PUBLIC_URL + the request path and query, not from the request as this process sees it: behind
a proxy or load balancer the host and scheme differ, and Twilio signed the public one. So
configure the provider with `{PUBLIC_URL}/v1/providers/sms/inbound`; the SMS channel sets
`{PUBLIC_URL}/v1/providers/sms/status?m=<message id>` on every message it sends.
"""

from __future__ import annotations

import json
from typing import Literal
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from activities.signing import SIGNATURE_HEADER, BadSignature, verify_signature, verify_twilio
from api.deps import PoolDep, SettingsDep, read_body
from api.errors import ApiError
from store.feedback import (
    BounceKind,
    adopt_provider_id,
    customers_by_phone,
    find_by_provider_id,
    normalize_phone,
    record_bounce,
    record_delivered,
    set_subscription,
    suppress,
    undo_channel_opt_out,
    unsuppress,
)

router = APIRouter(prefix="/v1/providers", tags=["providers"])

Channel = Literal["email", "sms", "push", "webhook", "in_app", "outbox"]
MAX_BODY_BYTES = 1024 * 1024
MAX_EVENTS = 1000
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_WORDS = frozenset({"START", "UNSTOP", "YES"})
# Twilio error codes that mean the number itself cannot receive messages (invalid, not a
# mobile, unknown handset, landline): a hard bounce. Anything else is soft, 30003 included
# (handset off or out of coverage: it will be reachable again).
PERMANENT_SMS_ERRORS = frozenset({"21211", "21614", "30005", "30006"})
_SOURCE = "sms_keyword"
_STOP_REASON = "stop"


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
    return await read_body(request, MAX_BODY_BYTES)


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
    counted as ignored. A hard bounce or a complaint suppresses the address. Off (404) unless
    PROVIDER_CALLBACK_SECRET is set."""
    if not settings.provider_callback_secret:  # unset or empty: off
        raise ApiError(
            404, "not_found", "provider callbacks are off: PROVIDER_CALLBACK_SECRET is not set"
        )
    raw = await _raw(request)
    try:
        verify_signature(
            settings.provider_callback_secret,
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
    if not settings.sms_api_url or not settings.sms_auth_token:
        # An empty token would make every signature computable by anyone.
        raise ApiError(
            404, "not_found", "SMS callbacks are off: SMS_API_URL or SMS_AUTH_TOKEN is not set"
        )
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

    The message is the one the query's `m` names (our id, set on the StatusCallback URL when
    the message was sent), else the one with that MessageSid: a callback can arrive before the
    send has recorded the sid, and then it records it. `delivered` records delivery;
    `undelivered` / `failed` a bounce, hard for the error codes that mean the number cannot
    receive (PERMANENT_SMS_ERRORS), else soft. Other statuses (queued, sent, ...) change
    nothing."""
    params = await _twilio_form(request, settings)
    sid = _required(params, "MessageSid")
    status = _required(params, "MessageStatus").lower()
    ours = request.query_params.get("m", "")
    async with pool.acquire() as conn, conn.transaction():
        msg = None
        if ours.isascii() and ours.isdigit() and len(ours) <= 18:
            msg = await adopt_provider_id(conn, int(ours), "sms", sid)
        if msg is None:
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

    The whole body, trimmed and case-insensitive, is the keyword; numbers match however they
    are formatted (`normalize_phone`). STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT
    unsubscribe every customer with that `phone` from all SMS (topic `*`) and suppress the
    number (reason `stop`), so a profile created later with it is not texted either. START,
    UNSTOP, YES undo exactly that: the `*` rows a STOP made and the `stop` suppression go, so
    each customer is back to CONSENT_DEFAULT and their own topic choices; a choice made any
    other way stays. Anything else changes nothing."""
    params = await _twilio_form(request, settings)
    phone = _required(params, "From")
    if not normalize_phone(phone):
        raise ApiError(400, "invalid_request", "From: not a phone number")
    word = params.get("Body", "").strip().upper()
    if word not in STOP_WORDS | START_WORDS:
        return _twiml(None)
    stop = word in STOP_WORDS
    async with pool.acquire() as conn, conn.transaction():
        for cid in await customers_by_phone(conn, phone):
            if stop:
                await set_subscription(conn, cid, "sms", "*", "unsubscribed", _SOURCE)
            else:
                await undo_channel_opt_out(conn, cid, "sms", _SOURCE)
        if stop:
            await suppress(conn, "sms", phone, _STOP_REASON)
        else:
            await unsuppress(conn, "sms", phone, _STOP_REASON)
    if stop:
        return _twiml(
            "You are unsubscribed and will receive no more messages. Reply START to resubscribe."
        )
    return _twiml("You are subscribed again. Reply STOP to unsubscribe.")
