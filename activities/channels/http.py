"""SMS, push and webhook channels over HTTP provider APIs.

Every request carries `Idempotency-Key: <the send's key>` (and Twilio's header name for it).
Providers that deduplicate on it — Stripe-style APIs, the local sandbox — answer a repeated key
with the first answer instead of sending again, and then a retried send (after a timeout or a
worker killed mid-call) delivers exactly once. A provider that ignores the key leaves the same
in-doubt window as SMTP (see activities.channels.email): a retry after the provider took the
message but before we recorded it sends again.

Answers:
- 2xx: delivered.
- 429: `ProviderBusy`, retried after Retry-After.
- 5xx, 401/403 (credentials), 404 (a wrong URL, unless the provider says the recipient is
  unknown), 408, 409 (key in use by an attempt still running), 425, 3xx, timeouts and
  connection errors: `ProviderUnavailable` or the httpx error, retried with backoff.
- A refusal about the recipient (Twilio 21211/21614, FCM UNREGISTERED / SENDER_ID_MISMATCH /
  invalid token):
  `PermanentDeliveryError`, a hard bounce that suppresses the address.
- Other 4xx (a request the provider will never accept): `PermanentDeliveryError` without
  suppression; only this message fails.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import httpx

from activities.channels import (
    Delivery,
    PermanentDeliveryError,
    ProviderBusy,
    ProviderUnavailable,
    RenderedMessage,
)
from activities.signing import SIGNATURE_HEADER, signature_header
from core.outbound import OutboundRefused

RETRYABLE_4XX = {401, 403, 404, 408, 409, 425}
# Twilio error codes about the number itself: invalid, not a mobile, unreachable region.
TWILIO_BAD_NUMBER = {21211, 21614}
RecipientError = Callable[[int, dict[str, Any]], bool]


def _never(status: int, detail: dict[str, Any]) -> bool:
    return False


def _twilio_bad_number(status: int, detail: dict[str, Any]) -> bool:
    return status == 400 and detail.get("code") in TWILIO_BAD_NUMBER


def _fcm_error_code(detail: dict[str, Any]) -> str | None:
    """FCM v1's `error.details[].errorCode` (or a bare `error` string, as older stand-ins)."""
    error = detail.get("error")
    if isinstance(error, str):
        return error
    if isinstance(error, dict):
        for item in error.get("details") or []:
            if isinstance(item, dict) and isinstance(item.get("errorCode"), str):
                return item["errorCode"]
    return None


def _fcm_bad_token(status: int, detail: dict[str, Any]) -> bool:
    """UNREGISTERED (404: the app was uninstalled) and SENDER_ID_MISMATCH (403: the token
    belongs to another sender) are about the token; any other 403 is about our project or
    credentials and stays retryable."""
    code = _fcm_error_code(detail)
    if (status, code) in ((404, "UNREGISTERED"), (403, "SENDER_ID_MISMATCH")):
        return True
    text = json.dumps(detail)
    return status == 400 and "INVALID_ARGUMENT" in text and "token" in text.lower()


def _check(
    channel: str, resp: httpx.Response, recipient: str | None, bad_recipient: RecipientError
) -> dict[str, Any]:
    status = resp.status_code
    if 200 <= status < 300:
        try:
            data = resp.json()
        except ValueError:
            data = {}
        return data if isinstance(data, dict) else {}
    try:
        detail = resp.json()
    except ValueError:
        detail = {"message": resp.text[:200]}
    if not isinstance(detail, dict):
        detail = {"message": str(detail)[:200]}
    text = str(detail.get("message") or detail.get("error") or detail)[:500]
    if status == 429:
        try:
            after = float(resp.headers.get("Retry-After", "1"))
        except ValueError:
            after = 1.0
        if not math.isfinite(after):
            after = 1.0
        raise ProviderBusy(channel, min(max(after, 0.1), 3600.0))
    if bad_recipient(status, detail):
        raise PermanentDeliveryError(status, text, recipient, suppress=True)
    if status >= 500 or status < 400 or status in RETRYABLE_4XX:
        raise ProviderUnavailable(
            f"{channel} provider answered {status}: {text}",
            # Answers that say the request was not processed; a 409 (key in use) or a
            # 500/502/504 may come after the provider took the message.
            not_sent=status < 400 or status in (401, 403, 404, 408, 425, 503),
        )
    raise PermanentDeliveryError(status, text, recipient, suppress=False)


def _headers(message: RenderedMessage) -> dict[str, str]:
    return {
        "Idempotency-Key": message.idempotency_key,
        "I-Twilio-Idempotency-Token": message.idempotency_key,
    }


class SmsChannel:
    """Twilio-style: POST {base}/Accounts/{sid}/Messages.json, form To/From/Body."""

    name = "sms"

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str,
        account_sid: str,
        auth_token: str,
        sender: str,
        status_callback: str | None = None,
    ) -> None:
        self.http = http
        self.url = f"{base_url.rstrip('/')}/Accounts/{account_sid}/Messages.json"
        self.auth = httpx.BasicAuth(account_sid, auth_token)
        self.sender = sender
        self.status_callback = status_callback

    async def deliver(self, message: RenderedMessage) -> Delivery:
        form = {"To": message.to or "", "From": self.sender, "Body": message.body}
        if self.status_callback:
            # Our id in the callback URL: a status that arrives before we recorded Twilio's
            # sid still finds its message.
            form["StatusCallback"] = f"{self.status_callback}?m={message.message_id}"
        resp = await self.http.post(self.url, data=form, auth=self.auth, headers=_headers(message))
        data = _check(self.name, resp, message.to, _twilio_bad_number)
        return Delivery(status="sent", provider_id=data.get("sid"))


class PushChannel:
    """FCM HTTP v1-style: POST {base}/v1/projects/{project}/messages:send with a bearer token."""

    name = "push"

    def __init__(
        self, http: httpx.AsyncClient, *, base_url: str, project_id: str, access_token: str
    ) -> None:
        self.http = http
        self.url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self.token = access_token

    async def deliver(self, message: RenderedMessage) -> Delivery:
        payload = {
            "message": {
                "token": message.to,
                "notification": {"title": message.subject or "", "body": message.body},
                "data": {
                    "message_id": str(message.message_id or ""),
                    "journey_id": message.journey_id or "",
                },
            }
        }
        resp = await self.http.post(
            self.url,
            json=payload,
            headers={**_headers(message), "Authorization": f"Bearer {self.token}"},
        )
        data = _check(self.name, resp, message.to, _fcm_bad_token)
        return Delivery(status="sent", provider_id=data.get("name"))


class WebhookChannel:
    """POST the message as JSON, signed (see activities.signing for how receivers verify).
    `http` is the guarded client (core.outbound): a URL inside our network fails the message
    with the reason instead of being retried."""

    name = "webhook"

    def __init__(self, http: httpx.AsyncClient, *, url: str, secret: str) -> None:
        self.http = http
        self.url = url
        self.secret = secret

    async def deliver(self, message: RenderedMessage) -> Delivery:
        body = json.dumps(
            {
                "id": message.idempotency_key,
                "message_id": message.message_id,
                "customer_id": message.customer_id,
                "journey_id": message.journey_id,
                "step_id": message.step_id,
                "subject": message.subject,
                "body": message.body,
            },
            separators=(",", ":"),
        ).encode()
        headers = {
            **_headers(message),
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(self.secret, body),
        }
        try:
            resp = await self.http.post(self.url, content=body, headers=headers)
        except OutboundRefused as err:
            raise PermanentDeliveryError(None, f"webhook channel URL refused: {err}", None,
                                         suppress=False) from err  # fmt: skip
        _check(self.name, resp, self.url, _never)
        return Delivery(status="sent", provider_id=message.idempotency_key)
