"""Inbound SMS keywords (Twilio-style webhook): STOP unsubscribes the number's customers from
every SMS topic (`*`), START subscribes them again; the answer is TwiML."""

from __future__ import annotations

from typing import Any

from activities.signing import twilio_signature
from core.settings import Settings
from tests.api.conftest import ADMIN
from tests.api.feedback_helpers import assert_error, customer, events

PATH = "/v1/providers/sms/inbound"
PHONE = "+15557654321"


def inbound(settings: Settings, body: str, *, sender: str = PHONE, sid: str = "SMin1") -> Any:
    params = {"From": sender, "To": settings.sms_from, "Body": body, "MessageSid": sid}
    # Twilio signs the URL it called: the public one, whatever host this process sees.
    url = settings.public_url.rstrip("/") + PATH
    sig = twilio_signature(settings.sms_auth_token, url, params)
    return {"data": params, "headers": {"X-Twilio-Signature": sig}}


async def sms_rows(db, cid: str) -> dict[str, tuple[str, str]]:
    rows = await db.fetch(
        "SELECT topic, status, source FROM subscriptions "
        "WHERE customer_id = $1 AND channel = 'sms'",
        cid,
    )
    return {r["topic"]: (r["status"], r["source"]) for r in rows}


async def test_stop_then_start(api, db, dev_env, settings):
    ann = await customer(api, db, dev_env.client, "ann", phone=PHONE)
    also = await customer(api, db, dev_env.client, "ann-work", phone=PHONE)
    other = await customer(api, db, dev_env.client, "bob", phone="+15550001111")
    r = await api.put(
        "/v1/customers/ann/subscriptions",
        json={"channel": "sms", "topic": "alerts", "status": "unsubscribed"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text

    r = await api.post(PATH, **inbound(settings, "  sToP \n"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/xml")
    assert r.text.startswith('<?xml version="1.0" encoding="UTF-8"?><Response><Message>')
    assert "unsubscribed" in r.text and r.text.endswith("</Message></Response>")
    assert (await sms_rows(db, ann))["*"] == ("unsubscribed", "sms_keyword")
    assert (await sms_rows(db, also))["*"] == ("unsubscribed", "sms_keyword")
    assert await sms_rows(db, other) == {}
    stops = await events(db, "Unsubscribed")
    sms_stops = [e for e in stops if e["payload"]["properties"]["topic"] == "*"]
    assert sorted(e["user_id"] for e in sms_stops) == ["ann", "ann-work"]
    assert sms_stops[0]["payload"]["properties"] == {
        "channel": "sms",
        "topic": "*",
        "source": "sms_keyword",
    }
    # Twilio retries a webhook it did not see answered: no second event.
    await api.post(PATH, **inbound(settings, "STOP"))
    assert len(await events(db, "Unsubscribed")) == len(stops)

    r = await api.post(PATH, **inbound(settings, "Start", sid="SMin2"))
    assert r.status_code == 200 and "<Message>" in r.text and "subscribed" in r.text
    assert await sms_rows(db, ann) == {
        "*": ("subscribed", "sms_keyword"),
        "alerts": ("subscribed", "sms_keyword"),
    }
    assert (await sms_rows(db, also))["*"] == ("subscribed", "sms_keyword")


async def test_other_bodies_change_nothing(api, db, dev_env, settings):
    ann = await customer(api, db, dev_env.client, "ann", phone=PHONE)
    for body in ("HELP", "please stop", "", "STOP it"):
        r = await api.post(PATH, **inbound(settings, body))
        assert r.status_code == 200, r.text
        assert r.text == '<?xml version="1.0" encoding="UTF-8"?><Response/>'
        assert r.headers["content-type"].startswith("application/xml")
    assert await sms_rows(db, ann) == {}
    assert await events(db, "Unsubscribed") == []
    # STOP from a number nobody has is still confirmed, and changes nothing.
    r = await api.post(PATH, **inbound(settings, "STOP", sender="+15550009999"))
    assert "<Message>" in r.text
    assert await db.fetchval("SELECT count(*) FROM subscriptions") == 0


async def test_merged_customers_are_left_alone(api, db, dev_env, settings):
    ann = await customer(api, db, dev_env.client, "ann", phone=PHONE)
    old = await customer(api, db, dev_env.client, "ann-old", phone=PHONE)
    await db.execute("UPDATE customers SET merged_into = $1 WHERE id = $2", ann, old)
    await api.post(PATH, **inbound(settings, "STOP"))
    assert (await sms_rows(db, ann))["*"][0] == "unsubscribed"
    assert await sms_rows(db, old) == {}


async def test_signature_is_checked_over_the_public_url(api, db, dev_env, settings):
    ann = await customer(api, db, dev_env.client, "ann", phone=PHONE)
    no_sig = inbound(settings, "STOP")
    del no_sig["headers"]["X-Twilio-Signature"]
    assert_error(await api.post(PATH, **no_sig), 401, "unauthorized", "X-Twilio-Signature")
    altered = inbound(settings, "START")
    altered["data"]["Body"] = "STOP"
    assert_error(await api.post(PATH, **altered), 401, "unauthorized", "X-Twilio-Signature")
    # Signed over the URL as this process sees it (http://test/...), not PUBLIC_URL: refused.
    params = {"From": PHONE, "To": settings.sms_from, "Body": "STOP", "MessageSid": "SMx"}
    local = twilio_signature(settings.sms_auth_token, f"http://test{PATH}", params)
    r = await api.post(PATH, data=params, headers={"X-Twilio-Signature": local})
    assert_error(r, 401, "unauthorized", "X-Twilio-Signature")
    wrong_token = Settings(sms_auth_token="not-ours", public_url=settings.public_url)
    assert_error(
        await api.post(PATH, **inbound(wrong_token, "STOP")),
        401,
        "unauthorized",
        "X-Twilio-Signature",
    )
    assert await sms_rows(db, ann) == {}
    missing = inbound(settings, "STOP", sender="")
    assert_error(await api.post(PATH, **missing), 400, "invalid_request", "From")
