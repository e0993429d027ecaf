"""SMS, push and webhook channels over HTTP provider APIs.

Every request carries `Idempotency-Key: <the send's key>`: the provider answers a repeated key
with the first answer instead of sending again (Stripe-style APIs do; Twilio's equivalent is
`I-Twilio-Idempotency-Token`, sent too). That is what makes a retried send — after a timeout,
a 5xx, or a worker killed mid-call — deliver exactly once.

Answers: 2xx delivered; 429 `ProviderBusy` (Retry-After honoured); 5xx, timeouts and
connection errors raise for a retry; other 4xx are permanent (`PermanentDeliveryError`: bad
number, unregistered device token), recorded as a bounce.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from activities.channels import Delivery, PermanentDeliveryError, ProviderBusy, RenderedMessage
from activities.signing import SIGNATURE_HEADER, signature_header


def _check(channel: str, resp: httpx.Response, recipient: str | None) -> dict[str, Any]:
    if resp.status_code == 429:
        try:
            after = float(resp.headers.get("Retry-After", "1"))
        except ValueError:
            after = 1.0
        raise ProviderBusy(channel, max(after, 0.1))
    if resp.status_code >= 500:
        resp.raise_for_status()  # retried
    if resp.status_code >= 400:
        try:
            detail = resp.json()
        except ValueError:
            detail = {"message": resp.text[:200]}
        message = str(detail.get("message") or detail.get("error") or detail)[:500]
        raise PermanentDeliveryError(resp.status_code, message, recipient)
    try:
        data = resp.json()
    except ValueError:
        data = {}
    return data if isinstance(data, dict) else {}


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
            form["StatusCallback"] = self.status_callback
        resp = await self.http.post(self.url, data=form, auth=self.auth, headers=_headers(message))
        data = _check(self.name, resp, message.to)
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
        data = _check(self.name, resp, message.to)
        return Delivery(status="sent", provider_id=data.get("name"))


class WebhookChannel:
    """POST the message as JSON, signed (see activities.signing for how receivers verify)."""

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
        resp = await self.http.post(self.url, content=body, headers=headers)
        _check(self.name, resp, self.url)
        return Delivery(status="sent", provider_id=message.idempotency_key)
