"""The feedback loop over HTTP: open pixel, click redirects, provider delivery/bounce callbacks,
and `Unsubscribed` events from links and the subscriptions API. Real Postgres, the real app."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from activities.links import sign, unsubscribe_url
from activities.signing import signature_header, twilio_signature
from activities.tracking import instrument
from api.routes.providers import MAX_BODY_BYTES
from core.settings import Settings
from tests.api.conftest import ADMIN
from tests.api.feedback_helpers import (
    app_client,
    assert_error,
    callbacks_on,
    customer,
    events,
    message,
    route,
)

HTML = (
    '<html><body><a href="https://shop.example/cart">Cart</a> '
    '<a href="https://shop.example/help?x=1&amp;y=2">Help</a></body></html>'
)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return callbacks_on(settings)


def _path(url: str, settings: Settings) -> str:
    assert url.startswith(settings.public_url)
    return url.removeprefix(settings.public_url)


async def _tracked(api, db, dev_env, settings) -> tuple[str, int, Any]:
    cid = await customer(api, db, dev_env.client, "ann", email="ann@example.com")
    mid = await message(db, cid)
    out = instrument(
        "Cart: https://shop.example/cart",
        HTML,
        base_url=settings.public_url,
        secret=settings.link_secret,
        message_id=mid,
    )
    await db.execute("UPDATE messages SET links = $2 WHERE id = $1", mid, out.links)
    return cid, mid, out


def _hrefs(kind: str, html: str) -> list[str]:
    return re.findall(rf'"(http[^"]+/v1/t/{kind}/[^"]+)"', html)


async def test_open_pixel_records_first_open_and_emits_one_event(api, db, dev_env, settings):
    cid, mid, out = await _tracked(api, db, dev_env, settings)
    [pixel] = _hrefs("o", out.html)
    first = await api.get(_path(pixel, settings))
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/gif"
    assert first.content.startswith(b"GIF89a") and len(first.content) < 64
    assert "no-store" in first.headers["cache-control"]
    opened_at = await db.fetchval("SELECT opened_at FROM messages WHERE id = $1", mid)
    assert opened_at is not None

    again = await api.get(_path(pixel, settings))
    assert again.status_code == 200
    assert await db.fetchval("SELECT opened_at FROM messages WHERE id = $1", mid) == opened_at
    [event] = await events(db, "Email Opened")
    assert event["message_id"] == f"fb:{mid}:opened"
    assert event["user_id"] == "ann" and event["type"] == "track"
    assert event["payload"]["properties"] == {
        "message_id": mid,
        "journey_id": "welcome",
        "step_id": "greet",
        "channel": "email",
    }
    # The router applies it like any other event: it belongs to Ann.
    await route(db, dev_env.client)
    assert await db.fetchval("SELECT customer_id FROM events WHERE id = $1", event["id"]) == cid


async def test_forged_altered_and_swapped_tokens_are_rejected(api, db, dev_env, settings):
    _, mid, out = await _tracked(api, db, dev_env, settings)
    [pixel] = _hrefs("o", out.html)
    [click, _] = _hrefs("c", out.html)
    token = pixel.rsplit("/", 1)[1]
    body, mac = token.split(".")
    altered = ("A" if body[0] != "A" else "B") + body[1:] + "." + mac
    assert_error(await api.get(f"/v1/t/o/{altered}"), 400, "invalid_link", "token")
    forged = sign("not-the-secret", {"k": "o", "m": str(mid)})
    assert_error(await api.get(f"/v1/t/o/{forged}"), 400, "invalid_link", "token")
    assert_error(await api.get("/v1/t/o/garbage"), 400, "invalid_link", "token")
    # An open token is no click token and the other way round.
    assert_error(await api.get(f"/v1/t/c/{token}"), 400, "invalid_link", "token")
    click_token = click.rsplit("/", 1)[1]
    assert_error(await api.get(f"/v1/t/o/{click_token}"), 400, "invalid_link", "token")
    # Well signed, but for a message that does not exist.
    unknown = sign(settings.link_secret, {"k": "o", "m": "999999"})
    assert_error(await api.get(f"/v1/t/o/{unknown}"), 404, "not_found", "token")
    assert await db.fetchval("SELECT opened_at FROM messages WHERE id = $1", mid) is None
    assert await events(db, "Email Opened") == []


async def test_click_redirects_only_to_links_of_the_message(api, db, dev_env, settings):
    _, mid, out = await _tracked(api, db, dev_env, settings)
    cart, help_ = _hrefs("c", out.html)
    assert out.links == ["https://shop.example/cart", "https://shop.example/help?x=1&y=2"]

    r = await api.get(_path(cart, settings))
    assert r.status_code == 302, r.text
    assert r.headers["location"] == "https://shop.example/cart"
    clicked_at = await db.fetchval("SELECT clicked_at FROM messages WHERE id = $1", mid)
    assert clicked_at is not None
    assert (await api.get(_path(cart, settings))).status_code == 302
    r = await api.get(_path(help_, settings))
    assert r.headers["location"] == "https://shop.example/help?x=1&y=2"
    assert await db.fetchval("SELECT clicked_at FROM messages WHERE id = $1", mid) == clicked_at

    clicks = await events(db, "Email Link Clicked")
    assert [e["payload"]["properties"]["url"] for e in clicks] == out.links
    assert all(e["message_id"].startswith(f"fb:{mid}:click:") for e in clicks)

    # A correctly signed token for a URL the message never held: no open redirect.
    evil = sign(settings.link_secret, {"k": "c", "m": str(mid), "u": "https://evil.example/"})
    r = await api.get(f"/v1/t/c/{evil}")
    assert_error(r, 400, "invalid_link", "token")
    assert "location" not in r.headers
    assert len(await events(db, "Email Link Clicked")) == 2


def _signed(settings: Settings, body: Any, *, age: int = 0) -> dict[str, Any]:
    raw = json.dumps(body).encode()
    assert settings.provider_callback_secret
    header = signature_header(settings.provider_callback_secret, raw, int(time.time()) - age)
    return {
        "content": raw,
        "headers": {"Journeys-Signature": header, "Content-Type": "application/json"},
    }


async def test_delivery_and_bounces_from_the_provider(api, db, dev_env, settings):
    cid = await customer(api, db, dev_env.client, "bob", email="Bob@Example.com")
    delivered = await message(db, cid, provider_id="<aa@mail.test>", address="Bob@Example.com")
    hard = await message(db, cid, provider_id="<bb@mail.test>", address="Bob@Example.com")
    soft = await message(db, cid, provider_id="<cc@mail.test>", address="soft@example.com")
    facts = [
        {"provider_id": "<aa@mail.test>", "type": "delivered"},
        {"provider_id": "bb@mail.test", "type": "bounced", "reason": "550 no such user"},
        {"provider_id": "<cc@mail.test>", "type": "bounced", "bounce": "soft"},
        {"provider_id": "<zz@mail.test>", "type": "delivered"},
    ]
    r = await api.post("/v1/providers/email/events", **_signed(settings, facts))
    assert r.status_code == 200, r.text
    assert r.json() == {"received": 4, "applied": 3, "ignored": 1}

    rows = {
        r["id"]: r
        for r in await db.fetch("SELECT id, status, skip_reason, delivered_at FROM messages")
    }
    assert rows[delivered]["delivered_at"] is not None and rows[delivered]["status"] == "sent"
    assert (rows[hard]["status"], rows[hard]["skip_reason"]) == ("bounced", "hard_bounce")
    assert (rows[soft]["status"], rows[soft]["skip_reason"]) == ("bounced", "soft_bounce")
    suppressed = await db.fetch("SELECT channel, address, reason FROM suppressions")
    assert [tuple(s) for s in suppressed] == [("email", "bob@example.com", "hard_bounce")]

    [ev] = await events(db, "Message Delivered")
    assert ev["message_id"] == f"fb:{delivered}:delivered"
    bounced = await events(db, "Message Bounced")
    assert {(e["message_id"], e["payload"]["properties"]["bounce_type"]) for e in bounced} == {
        (f"fb:{hard}:bounced", "hard"),
        (f"fb:{soft}:bounced", "soft"),
    }

    # The same callback again (providers retry): nothing new.
    r = await api.post("/v1/providers/email/events", **_signed(settings, facts))
    assert r.status_code == 200
    assert len(await events(db, "Message Bounced")) == 2
    assert len(await events(db, "Message Delivered")) == 1

    # A complaint, as a single object, suppresses too.
    complained = await message(db, cid, provider_id="<dd@mail.test>", address="c@example.com")
    body = {"provider_id": "<dd@mail.test>", "type": "complained"}
    r = await api.post("/v1/providers/email/events", **_signed(settings, body))
    assert r.json() == {"received": 1, "applied": 1, "ignored": 0}
    reason = "SELECT reason FROM suppressions WHERE address = 'c@example.com'"
    assert await db.fetchval(reason) == "complaint"
    skip = "SELECT skip_reason FROM messages WHERE id = $1"
    assert await db.fetchval(skip, complained) == "complaint"


async def test_provider_callbacks_need_a_fresh_valid_signature(api, db, dev_env, settings):
    cid = await customer(api, db, dev_env.client, "cy", email="cy@example.com")
    mid = await message(db, cid, provider_id="<ee@mail.test>", address="cy@example.com")
    body = {"provider_id": "<ee@mail.test>", "type": "bounced"}
    url = "/v1/providers/email/events"

    assert_error(await api.post(url, json=body), 401, "unauthorized", "Journeys-Signature")
    stale = _signed(settings, body, age=settings.webhook_tolerance_seconds + 60)
    assert_error(await api.post(url, **stale), 401, "unauthorized", "Journeys-Signature")
    tampered = _signed(settings, body)
    tampered["content"] = tampered["content"].replace(b"bounced", b"delivered")
    assert_error(await api.post(url, **tampered), 401, "unauthorized", "Journeys-Signature")
    other = _signed(Settings(provider_callback_secret="wrong"), body)
    assert_error(await api.post(url, **other), 401, "unauthorized", "Journeys-Signature")
    # Signed like our outgoing webhooks: a receiver of those replaying one to us is refused.
    ours = _signed(Settings(provider_callback_secret=settings.webhook_signing_secret), body)
    assert_error(await api.post(url, **ours), 401, "unauthorized", "Journeys-Signature")
    # A header that is not ASCII is a wrong signature, not a server error.
    now = int(time.time())
    for sig in (f"t={now},v1=\xe9t\xe9".encode("latin-1"), f"t={now},v1=x".encode() + b"\xff"):
        r = await api.post(url, json=body, headers={"Journeys-Signature": sig})
        assert_error(r, 401, "unauthorized", "Journeys-Signature")
    assert await db.fetchval("SELECT status FROM messages WHERE id = $1", mid) == "sent"
    assert await db.fetchval("SELECT count(*) FROM suppressions") == 0

    # Signed but invalid: the error names the field.
    bad = [{"provider_id": "<ee@mail.test>", "type": "delivered"}, {"provider_id": "x"}]
    assert_error(await api.post(url, **_signed(settings, bad)), 400, "invalid_request", "[1].type")
    assert_error(await api.post("/v1/providers/fax/events", **_signed(settings, body)), 400,
                 "invalid_request", "channel")  # fmt: skip


def _twilio(settings: Settings, path: str, params: dict[str, str]) -> dict[str, Any]:
    url = settings.public_url.rstrip("/") + path
    sig = twilio_signature(settings.sms_auth_token, url, params)
    return {"data": params, "headers": {"X-Twilio-Signature": sig}}


async def test_sms_status_callback(api, db, dev_env, settings):
    cid = await customer(api, db, dev_env.client, "dee", phone="+15551230000")
    ok = await message(db, cid, channel="sms", provider_id="SM1", address="+15551230000")
    gone = await message(db, cid, channel="sms", provider_id="SM2", address="+15551230000")
    busy = await message(db, cid, channel="sms", provider_id="SM3", address="+15559990000")
    away = await message(db, cid, channel="sms", provider_id="SM4", address="+15558880000")
    path = "/v1/providers/sms/status"

    def status(sid: str, value: str, code: str = "") -> dict[str, Any]:
        params = {"MessageSid": sid, "MessageStatus": value, "AccountSid": "AC-dev"}
        if code:
            params["ErrorCode"] = code
        return _twilio(settings, path, params)

    r = await api.post(path, **status("SM1", "sent"))
    assert r.json() == {"received": 1, "applied": 1, "ignored": 0}
    assert await db.fetchval("SELECT delivered_at FROM messages WHERE id = $1", ok) is None
    await api.post(path, **status("SM1", "delivered"))
    assert await db.fetchval("SELECT delivered_at FROM messages WHERE id = $1", ok) is not None
    await api.post(path, **status("SM2", "failed", "30005"))
    await api.post(path, **status("SM3", "undelivered", "30008"))
    # 30003: the handset is off or out of coverage, it will be back; soft, not suppressed.
    await api.post(path, **status("SM4", "undelivered", "30003"))
    rows = dict(await db.fetch("SELECT id, skip_reason FROM messages WHERE status = 'bounced'"))
    assert rows == {gone: "hard_bounce", busy: "soft_bounce", away: "soft_bounce"}
    suppressed = [tuple(s) for s in await db.fetch("SELECT channel, address FROM suppressions")]
    assert suppressed == [("sms", "+15551230000")]
    r = await api.post(path, **status("SM-unknown", "delivered"))
    assert r.json() == {"received": 1, "applied": 0, "ignored": 1}
    assert len(await events(db, "Message Delivered")) == 1

    forged = status("SM2", "delivered")
    forged["data"]["MessageStatus"] = "failed"
    assert_error(await api.post(path, **forged), 401, "unauthorized", "X-Twilio-Signature")
    missing = _twilio(settings, path, {"MessageStatus": "delivered"})
    assert_error(await api.post(path, **missing), 400, "invalid_request", "MessageSid")
    odd = status("SM1", "delivered")
    odd["headers"]["X-Twilio-Signature"] = "sign\xe9".encode("latin-1")
    assert_error(await api.post(path, **odd), 401, "unauthorized", "X-Twilio-Signature")


async def test_sms_status_before_the_sid_is_recorded(api, db, dev_env, settings):
    """Our StatusCallback URL names the message (`?m=`): a callback that beats the send's own
    write of the sid finds it, and records the sid."""
    cid = await customer(api, db, dev_env.client, "gus", phone="+15551230000")
    early = await message(db, cid, channel="sms", status="sending", address="+15551230000")
    known = await message(db, cid, channel="sms", provider_id="SM7", address="+15551230000")
    mail = await message(db, cid, channel="email", address="gus@example.com")
    base = "/v1/providers/sms/status"

    def status(path: str, sid: str, value: str = "delivered") -> dict[str, Any]:
        params = {"MessageSid": sid, "MessageStatus": value, "AccountSid": "AC-dev"}
        return _twilio(settings, path, params)

    # The signature covers the query: signed without it, refused.
    unsigned_query = status(base, "SM6")
    r = await api.post(f"{base}?m={early}", **unsigned_query)
    assert_error(r, 401, "unauthorized", "X-Twilio-Signature")

    r = await api.post(f"{base}?m={early}", **status(f"{base}?m={early}", "SM6"))
    assert r.json() == {"received": 1, "applied": 1, "ignored": 0}
    row = await db.fetchrow("SELECT provider_id, delivered_at FROM messages WHERE id = $1", early)
    assert row["provider_id"] == "SM6" and row["delivered_at"] is not None
    # From now on the sid finds it too, and the send's own write keeps the same sid.
    r = await api.post(base, **status(base, "SM6", "failed"))
    assert r.json()["applied"] == 1

    # A recorded sid is never replaced.
    r = await api.post(f"{base}?m={known}", **status(f"{base}?m={known}", "SM7-other"))
    assert r.json()["applied"] == 1
    assert await db.fetchval("SELECT provider_id FROM messages WHERE id = $1", known) == "SM7"
    # `m` naming no SMS message, or not a number: the sid decides.
    for m in (str(mail), "999999", "x1", "99999999999999999999999"):
        path = f"{base}?m={m}"
        r = await api.post(path, **status(path, "SM7"))
        assert r.json() == {"received": 1, "applied": 1, "ignored": 0}, m
    assert await db.fetchval("SELECT provider_id FROM messages WHERE id = $1", mail) is None
    path = f"{base}?m=999999"
    r = await api.post(path, **status(path, "SM-unknown"))
    assert r.json() == {"received": 1, "applied": 0, "ignored": 1}


async def test_callbacks_are_off_until_configured(db, settings):
    """No PROVIDER_CALLBACK_SECRET: no generic callback (the dev default of the outgoing
    secret is public). No SMS_API_URL: no SMS callbacks. 404, naming the setting."""
    off = settings.model_copy(update={"provider_callback_secret": None, "sms_api_url": None})
    body = {"provider_id": "<x@mail.test>", "type": "delivered"}
    async with app_client(off) as api:
        r = await api.post("/v1/providers/email/events", **_signed(settings, body))
        assert_error(r, 404, "not_found", "PROVIDER_CALLBACK_SECRET")
        params = {"MessageSid": "SM1", "MessageStatus": "delivered"}
        for path in ("/v1/providers/sms/status", "/v1/providers/sms/inbound"):
            r = await api.post(path, **_twilio(settings, path, params))
            assert_error(r, 404, "not_found", "SMS_API_URL")


async def test_bodies_over_the_limit_are_refused_without_reading_them(api, db, settings):
    read = 0

    async def chunks(total: int) -> AsyncIterator[bytes]:
        nonlocal read
        while read < total:
            read += 64 * 1024
            yield b" " * (64 * 1024)

    url = "/v1/providers/email/events"
    declared = {"Content-Length": str(MAX_BODY_BYTES + 1), "Content-Type": "application/json"}
    r = await api.post(url, content=chunks(MAX_BODY_BYTES + 1), headers=declared)
    assert_error(r, 400, "too_large", "body")
    assert read == 0  # refused on the header alone
    # Chunked, no Content-Length: refused as soon as the stream passes the limit.
    r = await api.post(url, content=chunks(10 * MAX_BODY_BYTES))
    assert_error(r, 400, "too_large", "body")
    assert MAX_BODY_BYTES < read <= MAX_BODY_BYTES + 3 * 64 * 1024
    bad = {"Content-Length": "12x", "Content-Type": "application/json"}
    r = await api.post(url, content=b'{"a": 1}', headers=bad)
    assert r.status_code == 400, r.text


async def test_unsubscribe_link_and_api_emit_unsubscribed_once_per_change(
    api, db, dev_env, settings
):
    cid = await customer(api, db, dev_env.client, "eve", email="eve@example.com")
    url = unsubscribe_url(settings.public_url, settings.link_secret, cid, "email", "marketing")
    for _ in range(2):
        r = await api.post(_path(url, settings))
        assert r.status_code == 200, r.text
    [ev] = await events(db, "Unsubscribed")
    assert ev["user_id"] == "eve"
    assert ev["payload"]["properties"] == {
        "channel": "email",
        "topic": "marketing",
        "source": "link",
    }

    sub = "/v1/customers/eve/subscriptions"
    news = {"channel": "email", "topic": "news", "status": "subscribed"}
    assert (await api.put(sub, json=news, headers=ADMIN)).status_code == 200
    assert len(await events(db, "Unsubscribed")) == 1  # opting in emits nothing
    for _ in range(2):
        r = await api.put(sub, json={**news, "status": "unsubscribed"}, headers=ADMIN)
        assert r.status_code == 200, r.text
    # Back in and out again: a second opt-out of the same topic is a new fact.
    await api.put(sub, json=news, headers=ADMIN)
    await api.put(sub, json={**news, "status": "unsubscribed", "source": "crm"}, headers=ADMIN)
    props = [e["payload"]["properties"] for e in await events(db, "Unsubscribed")]
    assert props[1:] == [
        {"channel": "email", "topic": "news", "source": "api"},
        {"channel": "email", "topic": "news", "source": "crm"},
    ]
    listed = (await api.get(sub, headers=ADMIN)).json()
    assert {(s["topic"], s["status"]) for s in listed} == {
        ("marketing", "unsubscribed"),
        ("news", "unsubscribed"),
    }


async def test_test_sends_record_feedback_without_events(api, db, dev_env, settings):
    cid = await customer(api, db, dev_env.client, "fay", email="fay@example.com")
    mid = await message(db, cid, test=True, provider_id="<ff@mail.test>")
    pixel = sign(settings.link_secret, {"k": "o", "m": str(mid)})
    assert (await api.get(f"/v1/t/o/{pixel}")).status_code == 200
    body = {"provider_id": "<ff@mail.test>", "type": "delivered"}
    r = await api.post("/v1/providers/email/events", **_signed(settings, body))
    assert r.json()["applied"] == 1
    row = await db.fetchrow("SELECT opened_at, delivered_at FROM messages WHERE id = $1", mid)
    assert row["opened_at"] is not None and row["delivered_at"] is not None
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'track'") == 0
