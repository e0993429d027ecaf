"""Stored templates (admin key): immutable versions, preview for a customer, test sends.

A journey's send step refers to a template by `ref`; publishing the journey pins the version
(see `store.journeys.resolve_templates`). Preview and test send render exactly as a send does
(`activities.rendering`, the context of `template_context`), with `journey` =
`{id: "preview", version: null}`.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Any

import asyncpg
from fastapi import APIRouter, Request

from activities.channels import PermanentDeliveryError, RenderedMessage
from activities.journey_activities import template_context
from activities.rendering import TemplateError, off_loop, render
from api.body import openapi_body, read_text, validated
from api.deps import AdminDep, ChannelsDep, PoolDep
from api.errors import ApiError
from core.logs import get_logger
from models.definition_errors import problem_of
from models.definition_text import ParsedText
from models.public import (
    Int32,
    RenderedTemplate,
    TemplateCreate,
    TemplateDetail,
    TemplatePreviewRequest,
    TemplatePublic,
    TemplateTestSendRequest,
    TemplateTestSendResult,
    TemplateUpdate,
    TemplateVersionPublic,
    TemplateVersionSummary,
)
from models.runtime import ProfileSnapshot
from store import templates as store
from store.profiles import find_customer
from store.templates import InvalidTemplate, TemplateContent, TemplateExists, TemplateNotFound

router = APIRouter(prefix="/v1/templates", tags=["templates"], dependencies=[AdminDep])
log = get_logger("api.templates")

PREVIEW_JOURNEY = "preview"
TEST_CUSTOMER = "test"  # messages.customer_id of a test send without a customer


async def _detail(pool: asyncpg.Pool, template_id: str) -> TemplateDetail:
    template = await store.get_template(pool, template_id)
    content = await store.get_version(pool, template_id)
    if template is None or content is None:
        raise ApiError(404, "not_found", f"no template {template_id!r}")
    versions = await store.list_versions(pool, template_id)
    return TemplateDetail(
        **asdict(template),
        subject=content.subject,
        body=content.body,
        html=content.html,
        versions=[TemplateVersionSummary(**asdict(v)) for v in versions],
    )


async def _content(pool: asyncpg.Pool, template_id: str, version: int | None) -> TemplateContent:
    content = await store.get_version(pool, template_id, version)
    if content is None:
        if version is not None and await store.get_template(pool, template_id) is not None:
            raise ApiError(404, "not_found", f"version: template {template_id!r} has no v{version}")
        raise ApiError(404, "not_found", f"no template {template_id!r}")
    return content


async def _profile(pool: asyncpg.Pool, ref: str) -> ProfileSnapshot:
    """The profile a send would render with (traits; timezone in stats, as at send time)."""
    customer_id = await find_customer(pool, ref)
    row = customer_id and await pool.fetchrow(
        "SELECT id, traits, timezone FROM customers WHERE id = $1", customer_id
    )
    if not row:
        raise ApiError(404, "not_found", f"customer_id: no customer {ref!r}")
    return ProfileSnapshot(
        customer_id=row["id"], traits=dict(row["traits"]), stats={"timezone": row["timezone"]}
    )


def _render(content: TemplateContent, ctx: dict[str, Any]) -> dict[str, str | None]:
    """subject, body and html rendered; a failure is a 422 naming the field and the variable.
    Called through `off_loop` (a render may take its whole budget; requests keep flowing)."""
    out: dict[str, str | None] = {}
    for field in ("subject", "body", "html"):
        source = getattr(content, field)
        try:
            out[field] = render(source, ctx, html=field == "html") if source is not None else None
        except TemplateError as err:
            raise ApiError(
                422,
                "template_error",
                f"{field}: template {content.template_id!r} v{content.version}: {err}",
            ) from None
    return out


def _invalid(err: InvalidTemplate, text: ParsedText) -> ApiError:
    """422 naming the field (`body: template error: ...`), with its line and column."""
    return ApiError(422, "invalid_template", str(problem_of(str(err), text)))


@router.post(
    "",
    response_model=TemplateDetail,
    status_code=201,
    openapi_extra=openapi_body(TemplateCreate.model_json_schema(), "a template, JSON or YAML"),
)
async def create_template(request: Request, pool: PoolDep) -> TemplateDetail:
    """A new template and its version 1. The content must parse and read only `profile`,
    `customer`, `event` and `journey` (422 naming the field otherwise). JSON or YAML."""
    text = await read_text(request, "a template")
    assert text is not None  # required
    body = validated(text, TemplateCreate)
    async with pool.acquire() as conn:
        try:
            await store.create_template(
                conn,
                body.id,
                channel=body.channel,
                subject=body.subject,
                body=body.body,
                html=body.html,
                name=body.name,
            )
        except InvalidTemplate as err:
            raise _invalid(err, text) from None
        except TemplateExists as err:
            raise ApiError(409, "already_exists", str(err)) from None
    return await _detail(pool, body.id)


@router.put(
    "/{template_id}",
    response_model=TemplateDetail,
    openapi_extra=openapi_body(TemplateUpdate.model_json_schema(), "the content, JSON or YAML"),
)
async def update_template(template_id: str, request: Request, pool: PoolDep) -> TemplateDetail:
    """The content as a new immutable version, now current (unchanged content: same version).
    Published journeys keep the version they pinned; publish them again to pick this one up.
    JSON or YAML."""
    text = await read_text(request, "a template")
    assert text is not None  # required
    body = validated(text, TemplateUpdate)
    async with pool.acquire() as conn:
        try:
            await store.add_version(
                conn,
                template_id,
                subject=body.subject,
                body=body.body,
                html=body.html,
                name=body.name,
            )
        except InvalidTemplate as err:
            raise _invalid(err, text) from None
        except TemplateNotFound as err:
            raise ApiError(404, "not_found", str(err)) from None
    return await _detail(pool, template_id)


@router.get("", response_model=list[TemplatePublic])
async def list_templates(pool: PoolDep) -> list[TemplatePublic]:
    return [TemplatePublic(**asdict(t)) for t in await store.list_templates(pool)]


@router.get("/{template_id}", response_model=TemplateDetail)
async def get_template(template_id: str, pool: PoolDep) -> TemplateDetail:
    """The current content and every version."""
    return await _detail(pool, template_id)


@router.get("/{template_id}/versions/{version}", response_model=TemplateVersionPublic)
async def get_template_version(
    template_id: str, version: Int32, pool: PoolDep
) -> TemplateVersionPublic:
    return TemplateVersionPublic(**asdict(await _content(pool, template_id, version)))


@router.post("/{template_id}/preview", response_model=RenderedTemplate)
async def preview_template(
    template_id: str, body: TemplatePreviewRequest, pool: PoolDep
) -> RenderedTemplate:
    """Render for one customer (and an optional `event`) without sending anything."""
    content = await _content(pool, template_id, body.version)
    profile = await _profile(pool, body.customer_id)
    ctx = template_context(profile, body.event, PREVIEW_JOURNEY)
    return RenderedTemplate(
        template_id=template_id,
        version=content.version,
        channel=content.channel,
        customer_id=profile.customer_id,
        **await off_loop(_render, content, ctx),
    )


@router.post("/{template_id}/test-send", response_model=TemplateTestSendResult)
async def test_send_template(
    template_id: str, body: TemplateTestSendRequest, pool: PoolDep, channels: ChannelsDep
) -> TemplateTestSendResult:
    """Render (with the customer's profile, else an empty one) and deliver to `to` on the
    template's channel. Recorded in `messages` as a transactional message with `test = true`
    (frequency caps do not count it); the email subject starts with `[TEST] `."""
    content = await _content(pool, template_id, body.version)
    if body.customer_id is not None:
        profile = await _profile(pool, body.customer_id)
    else:
        profile = ProfileSnapshot(customer_id=TEST_CUSTOMER, traits={}, stats={"timezone": None})
    ctx = template_context(profile, body.event, PREVIEW_JOURNEY)
    rendered = await off_loop(_render, content, ctx)
    if content.channel == "email":
        rendered["subject"] = f"[TEST] {rendered['subject'] or ''}".rstrip()
    key = f"test:{uuid.uuid4()}"
    bound = log.bind(template_id=template_id, version=content.version, key=key)
    channel = channels.get(content.channel)
    if channel is None:
        raise ApiError(
            409,
            "channel_unavailable",
            f"channel: {content.channel!r} is not configured on this deployment",
        )
    message_id = await pool.fetchval(
        "INSERT INTO messages (idempotency_key, customer_id, channel, subject, body, html, "
        "status, category, address, template_id, template_version, test, attempts, "
        "claimed_at) VALUES ($1, $2, $3, $4, $5, $6, 'sending', 'transactional', $7, $8, "
        "$9, true, 1, now()) RETURNING id",
        key,
        profile.customer_id,
        content.channel,
        rendered["subject"],
        rendered["body"],
        rendered["html"],
        body.to,
        template_id,
        content.version,
    )
    message = RenderedMessage(
        idempotency_key=key,
        customer_id=profile.customer_id,
        channel=content.channel,
        subject=rendered["subject"],
        body=rendered["body"] or "",  # never None: body is required
        to=body.to,
        html=rendered["html"],
        message_id=message_id,
    )
    try:
        delivery = await channel.deliver(message)
    except Exception as err:
        # No retry here: the caller sees the provider's answer and may try again.
        status = "bounced" if isinstance(err, PermanentDeliveryError) else "failed"
        await pool.execute(
            "UPDATE messages SET status = $2, error = $3 WHERE id = $1",
            message_id,
            status,
            str(err)[:1000],
        )
        bound.warning("template.test_send_failed", channel=content.channel, error=str(err))
        raise ApiError(
            502, "delivery_failed", f"to: {content.channel} delivery failed: {err}"
        ) from None
    await pool.execute(
        "UPDATE messages SET status = $2, provider_id = $3, sent_at = now() WHERE id = $1",
        message_id,
        delivery.status,
        delivery.provider_id,
    )
    bound.info("template.test_send", channel=content.channel, message_id=message_id)
    return TemplateTestSendResult(
        template_id=template_id,
        version=content.version,
        channel=content.channel,
        customer_id=profile.customer_id,
        message_id=message_id,
        idempotency_key=key,
        to=body.to,
        status=delivery.status,
        provider_id=delivery.provider_id,
        **rendered,
    )
