"""Signed HTTP bodies, both directions.

Outgoing webhooks carry `Journeys-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<raw body>">` (the Stripe scheme): receivers recompute it over the raw body with the shared
secret, compare in constant time, and reject a `t` outside their tolerance (we use 300 s) so a
captured request cannot be replayed later. Provider callbacks to us are verified the same way;
Twilio-style SMS callbacks carry Twilio's own `X-Twilio-Signature` instead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

SIGNATURE_HEADER = "Journeys-Signature"


class BadSignature(ValueError):
    """Missing, malformed, wrong or too old."""


def same(expected: str, given: str) -> bool:
    """Constant-time equality of an ASCII signature and a header value. `compare_digest`
    raises TypeError on non-ASCII str, and a header may carry any byte: such a value is
    simply not our signature."""
    return given.isascii() and hmac.compare_digest(expected.encode(), given.encode())


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(
    secret: str, header: str | None, body: bytes, *, tolerance: int = 300, now: float | None = None
) -> None:
    if not header:
        raise BadSignature(f"missing {SIGNATURE_HEADER} header")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError):
        raise BadSignature("no timestamp (t=) in the signature header") from None
    if abs((time.time() if now is None else now) - t) > tolerance:
        raise BadSignature(f"timestamp outside the {tolerance} s tolerance")
    want = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    if not any(same(want, v) for v in parts.get("v1", [])):
        raise BadSignature("signature does not match")


def twilio_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's request signature: base64 HMAC-SHA1 of the full URL followed by each POST
    parameter name and value, sorted by name."""
    data = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(
        hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    ).decode()


def verify_twilio(auth_token: str, header: str | None, url: str, params: dict[str, str]) -> None:
    if not header or not same(twilio_signature(auth_token, url, params), header):
        raise BadSignature("X-Twilio-Signature does not match")
