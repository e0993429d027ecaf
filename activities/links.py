"""Signed links in messages (unsubscribe now; click tracking later): HMAC-SHA256 over the
payload with LINK_SECRET, so a link cannot be forged or pointed at someone else."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json


class BadLink(ValueError):
    """A forged, altered or malformed link."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: str, payload: dict[str, str]) -> str:
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()[:16]
    return f"{body}.{_b64(mac)}"


def verify(secret: str, token: str) -> dict[str, str]:
    body, _, mac = token.partition(".")
    want = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()[:16]
    try:
        if not hmac.compare_digest(_unb64(mac), want):
            raise BadLink("signature does not match")
        payload = json.loads(_unb64(body))
    except (ValueError, TypeError) as err:
        raise BadLink(f"malformed link: {err}") from None
    if not isinstance(payload, dict):
        raise BadLink("malformed link")
    return payload


def unsubscribe_url(base: str, secret: str, customer_id: str, channel: str, topic: str) -> str:
    token = sign(secret, {"c": customer_id, "ch": channel, "t": topic})
    return f"{base.rstrip('/')}/v1/unsubscribe/{token}"
