"""Outgoing webhook calls for the `webhook` step, signed like the webhook channel (see
activities.signing) when a signing secret is configured. The client is the guarded one
(core.outbound): a URL that reaches our own network fails the step at once, never retried."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import httpx
from temporalio.exceptions import ApplicationError

from activities.rendering import TemplateError, off_loop, render
from activities.signing import SIGNATURE_HEADER, signature_header
from core.outbound import OutboundRefused
from models.runtime import WebhookRequest, WebhookResult

MAX_BODY = 64 * 1024


def render_payload(value: Any, ctx: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return render(value, ctx)
    if isinstance(value, dict):
        return {k: render_payload(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [render_payload(v, ctx) for v in value]
    return value


async def call(
    client: httpx.AsyncClient,
    req: WebhookRequest,
    ctx: dict[str, Any],
    secret: str | None = None,
) -> WebhookResult:
    try:
        payload = await off_loop(render_payload, req.payload, ctx)
    except TemplateError as err:
        raise ApplicationError(
            f"step {req.step_id!r}: template error: {err}", type="TemplateError"
        ) from err
    headers = {"Idempotency-Key": req.idempotency_key, **req.headers}
    body = b"" if req.method == "GET" else json.dumps(payload, separators=(",", ":")).encode()
    if body:
        headers.setdefault("Content-Type", "application/json")
    if secret:
        headers[SIGNATURE_HEADER] = signature_header(secret, body)
    try:
        resp = await client.request(
            req.method,
            req.url,
            content=body or None,
            headers=headers,
            timeout=req.timeout_seconds,
        )
    except OutboundRefused as err:
        # An answer about the URL, not an outage: the step's on_error, like a 4xx.
        raise ApplicationError(
            f"step {req.step_id!r}: url refused: {err}", type="OutboundRefused", non_retryable=True
        ) from err
    except httpx.HTTPError as err:
        raise ApplicationError(f"webhook {req.url}: {err!r}", type="WebhookUnavailable") from err
    if resp.status_code >= 500 or resp.status_code == 429:
        # Retried by Temporal with backoff; the same Idempotency-Key goes with every attempt.
        raise ApplicationError(f"webhook {req.url} answered {resp.status_code}", type="Webhook5xx")
    # Kept in the run's state (and carried over continue-as-new): bounded.
    body: Any = resp.text[:MAX_BODY]
    if "json" in resp.headers.get("content-type", "") and len(resp.content) <= MAX_BODY:
        with contextlib.suppress(ValueError):  # declared JSON but is not: keep the text
            body = resp.json()
    return WebhookResult(status=resp.status_code, ok=resp.status_code < 400, body=body)
