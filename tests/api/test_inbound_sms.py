"""Inbound SMS keywords (Twilio-style webhook): STOP unsubscribes the number's customers from
every SMS topic (`*`) and suppresses the number, START undoes exactly that; the answer is
TwiML."""

from __future__ import annotations

from typing import Any

import pytest

from activities.signing import twilio_signature
from core.settings import Settings
from store.feedback import CUSTOMERS_BY_PHONE, customers_by_phone
from tests.api.conftest import ADMIN
from tests.api.feedback_helpers import assert_error, callbacks_on, customer, events

PATH = "/v1/providers/sms/inbound"
PHONE = "+15557654321"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return callbacks_on(settings)


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


async def suppressed(db) -> list[tuple[str, str, str]]:
    rows = await db.fetch("SELECT channel, address, reason FROM suppressions ORDER BY address")
    return [tuple(r) for r in rows]


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

    # The number itself is suppressed: a profile made later with it is not texted either.
    assert await suppressed(db) == [("sms", PHONE, "stop")]

    r = await api.post(PATH, **inbound(settings, "Start", sid="SMin2"))
    assert r.status_code == 200 and "<Message>" in r.text and "subscribed" in r.text
    # START undoes the STOP and nothing else: back to CONSENT_DEFAULT, and Ann's own "no" to
    # alerts stands.
    assert await sms_rows(db, ann) == {"alerts": ("unsubscribed", "api")}
    assert await sms_rows(db, also) == {}
    assert await suppressed(db) == []


async def test_start_never_opts_anyone_in(api, db, dev_env, settings):
    """A YES from someone who never texted STOP changes nothing, and START lifts only what a
    STOP did: not an admin's opt-out of the whole channel, not a hard bounce."""
    ann = await customer(api, db, dev_env.client, "ann", phone=PHONE)
    bob = await customer(api, db, dev_env.client, "bob", phone="+15550001111")
    for ref, topic in (("ann", "marketing"), ("bob", "*")):
        r = await api.put(
            f"/v1/customers/{ref}/subscriptions",
            json={"channel": "sms", "topic": topic, "status": "unsubscribed"},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
    await db.execute(
        "INSERT INTO suppressions (channel, address, reason) "
        "VALUES ('sms', '+15550001111', 'hard_bounce')"
    )
    before = (await sms_rows(db, ann), await sms_rows(db, bob), await suppressed(db))
    for word in ("YES", "START", "unstop"):
        for sender in (PHONE, "+15550001111"):
            r = await api.post(PATH, **inbound(settings, word, sender=sender))
            assert r.status_code == 200, r.text
    assert (await sms_rows(db, ann), await sms_rows(db, bob), await suppressed(db)) == before
    assert before[1] == {"*": ("unsubscribed", "api")}


async def test_numbers_match_however_they_are_written(api, db, dev_env, settings):
    ann = await customer(api, db, dev_env.client, "ann", phone="+1 (555) 765-4321")
    dots = await customer(api, db, dev_env.client, "ann-dots", phone=" +1.555.765.4321 ")
    other = await customer(api, db, dev_env.client, "bob", phone="+1 555 765 4322")
    r = await api.post(PATH, **inbound(settings, "STOP", sender="+1 555-765-4321"))
    assert r.status_code == 200, r.text
    assert (await sms_rows(db, ann))["*"][0] == "unsubscribed"
    assert (await sms_rows(db, dots))["*"][0] == "unsubscribed"
    assert await sms_rows(db, other) == {}
    assert await suppressed(db) == [("sms", PHONE, "stop")]
    await api.post(PATH, **inbound(settings, "START"))
    assert await sms_rows(db, ann) == {} and await suppressed(db) == []
    # Admins see and remove suppressions by the number in any format too.
    r = await api.post(
        "/v1/suppressions", json={"channel": "sms", "address": "+1 (555) 765-4321"}, headers=ADMIN
    )
    assert r.status_code == 201 and r.json()["address"] == PHONE, r.text
    r = await api.delete("/v1/suppressions/sms/+1.555.765.4321", headers=ADMIN)
    assert r.status_code == 204, r.text
    r = await api.post("/v1/suppressions", json={"channel": "sms", "address": "n/a"}, headers=ADMIN)
    assert_error(r, 400, "invalid_request", "address")
    r = await api.post(PATH, **inbound(settings, "STOP", sender="unknown"))
    assert_error(r, 400, "invalid_request", "From")


async def test_the_phone_lookup_uses_its_index(db):
    """The query's expression and predicate are the index's, or every inbound SMS scans all
    customers."""
    async with db.acquire() as conn, conn.transaction():
        # Enough customers, with statistics, that the planner's choice is about selectivity
        # (on an empty table any index on live customers looks as cheap as this one).
        await conn.execute(
            "INSERT INTO customers (id, traits) SELECT 'c' || i, "
            "jsonb_build_object('phone', '+1555' || lpad(i::text, 7, '0')) "
            "FROM generate_series(1, 2000) i"
        )
        await conn.execute("ANALYZE customers")
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {CUSTOMERS_BY_PHONE}", PHONE))
        assert await customers_by_phone(conn, "") == []
    assert "ix_customers_phone" in plan, plan


async def test_the_whole_channel_topic_is_listed_and_editable(api, db, dev_env, settings):
    await customer(api, db, dev_env.client, "ann", phone=PHONE)
    await api.post(PATH, **inbound(settings, "STOP"))
    sub = "/v1/customers/ann/subscriptions"
    r = await api.get(sub, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == [
        {"channel": "sms", "topic": "*", "status": "unsubscribed", "source": "sms_keyword"}
    ]
    star = {"channel": "sms", "topic": "*", "status": "subscribed", "source": "support"}
    r = await api.put(sub, json=star, headers=ADMIN)
    assert r.status_code == 200 and r.json() == star, r.text
    assert (await api.get(sub, headers=ADMIN)).json() == [star]
    for topic in ("**", "*x", "x*", "Marketing"):
        r = await api.put(sub, json={**star, "topic": topic}, headers=ADMIN)
        assert_error(r, 400, "invalid_request", "topic")


async def test_other_bodies_change_nothing(api, db, dev_env, settings):
    ann = await customer(api, db, dev_env.client, "ann", phone=PHONE)
    for body in ("HELP", "please stop", "", "STOP it"):
        r = await api.post(PATH, **inbound(settings, body))
        assert r.status_code == 200, r.text
        assert r.text == '<?xml version="1.0" encoding="UTF-8"?><Response/>'
        assert r.headers["content-type"].startswith("application/xml")
    assert await sms_rows(db, ann) == {}
    assert await events(db, "Unsubscribed") == []
    assert await suppressed(db) == []
    # STOP from a number nobody has yet is confirmed, and suppresses the number.
    r = await api.post(PATH, **inbound(settings, "STOP", sender="+15550009999"))
    assert "<Message>" in r.text
    assert await db.fetchval("SELECT count(*) FROM subscriptions") == 0
    assert await suppressed(db) == [("sms", "+15550009999", "stop")]


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
    odd = inbound(settings, "STOP")
    odd["headers"]["X-Twilio-Signature"] = "\xe9".encode("latin-1")
    assert_error(await api.post(PATH, **odd), 401, "unauthorized", "X-Twilio-Signature")
    assert await sms_rows(db, ann) == {} and await suppressed(db) == []
    missing = inbound(settings, "STOP", sender="")
    assert_error(await api.post(PATH, **missing), 400, "invalid_request", "From")
