"""Signed links in messages (unsubscribe, open pixel, click redirects): HMAC-SHA256 over the
payload with LINK_SECRET, so a link cannot be forged or pointed at someone else.

A token has exactly one spelling: unpadded base64url, canonical (the unused low bits of the
last character are zero). Any other spelling of the same bytes (another last character, a
trailing `=`) is refused, so a link is never malleable into a second valid URL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re


class BadLink(ValueError):
    """A forged, altered or malformed link."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _unb64(text: str) -> bytes:
    """Strict: only the base64url alphabet, no padding, and the canonical encoding of what it
    decodes to (re-encoding gives the input back)."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise BadLink("malformed link: not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise BadLink("malformed link: non-canonical encoding")
    return data


def sign(secret: str, payload: dict[str, str]) -> str:
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()[:16]
    return f"{body}.{_b64(mac)}"


def verify(secret: str, token: str) -> dict[str, str]:
    """The payload of a genuine token, else BadLink. The signature is compared as text with
    its one canonical spelling, in constant time."""
    body, _, mac = token.partition(".")
    if not (body.isascii() and mac.isascii()):
        raise BadLink("malformed link: not ASCII")
    want = _b64(hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()[:16])
    if not hmac.compare_digest(want.encode(), mac.encode()):
        raise BadLink("signature does not match")
    try:
        payload = json.loads(_unb64(body))
    except BadLink:
        raise
    except (ValueError, TypeError) as err:
        raise BadLink(f"malformed link: {err}") from None
    if not isinstance(payload, dict):
        raise BadLink("malformed link")
    return payload


def unsubscribe_url(base: str, secret: str, customer_id: str, channel: str, topic: str) -> str:
    token = sign(secret, {"c": customer_id, "ch": channel, "t": topic})
    return f"{base.rstrip('/')}/v1/unsubscribe/{token}"
