"""Contact policy at every send: caps across journeys (atomic), consent, suppression,
addresses, transactional exemption, per-journey caps; every skip recorded with its reason."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from activities.contact_policy import Cap, ContactPolicy, parse_caps
from tests.harness import ADMIN, admin_api, engine, identify, track


def _journey(jid: str, **send: Any) -> dict[str, Any]:
    return {
        "id": jid,
        "name": jid,
        "entry": {"event": "Started"},
        "steps": [{"id": "hello", "kind": "send", "template": {"body": jid}, **send}],
    }


async def test_journeys_racing_for_the_last_slots_of_a_cap(db, ts_env):
    policy = ContactPolicy([Cap(3, timedelta(days=7))])
    async with engine(db, ts_env, policy=policy) as eng:
        for i in range(5):
            await eng.publish(_journey(f"promo{i}"))
        await eng.publish(_journey("receipt", category="transactional"))
        await eng.send(track("racer", "Started"))  # six journeys start at once
        for jid in [f"promo{i}" for i in range(5)] + ["receipt"]:
            await eng.result(await eng.run(jid, "racer"))
        rows = await eng.messages("racer")
        marketing = [r for r in rows if r["category"] == "marketing"]
        assert sorted(r["status"] for r in marketing) == ["sent"] * 3 + ["skipped"] * 2
        assert {r["skip_reason"] for r in marketing if r["status"] == "skipped"} == {"capped"}
        receipt = [r for r in rows if r["journey_id"] == "receipt"]
        assert [(r["status"], r["category"]) for r in receipt] == [("sent", "transactional")]


async def test_unsubscribe_stops_the_next_message_and_resubscribe_restores(db, pg_url, dev_env):
    async with engine(db, dev_env) as eng, admin_api(eng, pg_url) as api:
        await eng.publish(_journey("news", topic="newsletter"))
        await eng.send(identify("sub"))
        put = {"channel": "outbox", "topic": "newsletter", "status": "unsubscribed"}
        r = await api.put("/v1/customers/sub/subscriptions", json=put, headers=ADMIN)
        assert r.status_code == 200
        await eng.send(track("sub", "Started"))
        result = await (await eng.run("news", "sub")).result()
        assert result.status == "completed"
        assert [(m["status"], m["skip_reason"]) for m in await eng.messages("sub")] == [
            ("skipped", "no_consent")
        ]
        listed = (await api.get("/v1/customers/sub/subscriptions", headers=ADMIN)).json()
        assert listed == [{**put, "source": "api"}]
        await api.put(
            "/v1/customers/sub/subscriptions", json={**put, "status": "subscribed"}, headers=ADMIN
        )
        await eng.send(track("sub", "Started"))
        await (await eng.run("news", "sub")).result()
        assert [m["status"] for m in await eng.messages("sub")] == ["skipped", "sent"]
        bad = await api.put(
            "/v1/customers/sub/subscriptions", json={**put, "status": "maybe"}, headers=ADMIN
        )
        assert bad.status_code == 400
        assert "status" in bad.json()["message"]


async def test_suppression_and_missing_addresses(db, pg_url, dev_env):
    policy = ContactPolicy([])
    async with engine(db, dev_env) as eng, admin_api(eng, pg_url) as api:
        r = await api.post(
            "/v1/suppressions",
            json={"channel": "email", "address": "Bounced@Example.com", "reason": "hard_bounce"},
            headers=ADMIN,
        )
        assert r.status_code == 201
        assert r.json()["address"] == "bounced@example.com"
        async with db.acquire() as conn, conn.transaction():
            decide = lambda traits, **kw: policy.decide(  # noqa: E731
                conn, customer_id="c", traits=traits, channel=kw.get("channel", "email"),
                category=kw.get("category", "marketing"), topic="marketing", journey_id="j",
            )  # fmt: skip
            assert (await decide({"email": "bounced@example.com"})).reason == "suppressed"
            transactional = await decide({"email": "bounced@example.com"}, category="transactional")
            assert transactional.reason == "suppressed"  # suppression binds transactional too
            assert (await decide({})).reason == "no_address"
            assert (await decide({}, channel="sms")).reason == "no_address"
            ok = await decide({"email": " Fine@Example.com "})
            assert (ok.allowed, ok.address) == (True, "fine@example.com")
        url = "/v1/suppressions/email/bounced@example.com"
        assert (await api.delete(url, headers=ADMIN)).status_code == 204
        assert (await api.delete(url, headers=ADMIN)).status_code == 404


async def test_per_journey_cap_and_cap_settings(db, ts_env):
    async with engine(db, ts_env, policy=ContactPolicy([])) as eng:
        await eng.publish({**_journey("daily"), "frequency_cap": "1/1d"})
        await eng.send(track("pj", "Started"))
        await eng.result(await eng.run("daily", "pj"))
        await eng.send(track("pj", "Started"))
        await eng.result(await eng.run("daily", "pj"))
        assert [m["skip_reason"] for m in await eng.messages("pj")] == [None, "capped"]
    caps = parse_caps("3/7d", "email=2/1d, sms=1/12h")
    assert caps == [
        Cap(3, timedelta(days=7)),
        Cap(2, timedelta(days=1), channel="email"),
        Cap(1, timedelta(hours=12), channel="sms"),
    ]


async def test_policy_counts_bounced_sends_and_a_channel_stop_blocks_transactional(db):
    await db.execute("INSERT INTO customers (id, traits) VALUES ('pc', '{}')")
    await db.execute(
        "INSERT INTO messages (idempotency_key, customer_id, channel, body, status, sent_at) "
        "VALUES ('k1', 'pc', 'sms', 'x', 'bounced', now())"  # sent, then a complaint
    )
    policy = ContactPolicy([Cap(1, timedelta(days=7))])
    traits = {"phone": "+15550001111"}

    async def decide(category: str) -> str | None:
        async with db.acquire() as conn, conn.transaction():
            await policy.lock(conn, "pc")
            d = await policy.decide(
                conn, customer_id="pc", traits=traits, channel="sms", category=category,
                topic="marketing", journey_id="j",
            )  # fmt: skip
            return d.reason

    assert await decide("marketing") == "capped"  # the bounced message still counts
    assert await decide("transactional") is None
    await db.execute(
        "INSERT INTO subscriptions (customer_id, channel, topic, status, source) "
        "VALUES ('pc', 'sms', '*', 'unsubscribed', 'sms_keyword')"
    )
    assert await decide("transactional") == "no_consent"  # STOP: nothing more by SMS
