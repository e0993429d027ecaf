"""Journeys sending on SMS, push, webhook and in-app through a real local provider: exactly one
delivery per send through outages, timeouts and rate limits; fallback lists; `best`; inbox."""

from __future__ import annotations

from typing import Any

import pytest

from activities.channels import build_channels
from activities.rate_limits import RateLimits
from core.settings import Settings
from tests.conftest import eventually
from tests.harness import ADMIN, admin_api, engine, identify, track
from tests.providers import INVALID_NUMBER, UNREGISTERED, Provider, provider_settings


def _journey(jid: str, channel: Any, **template: Any) -> dict[str, Any]:
    return {
        "id": jid,
        "name": jid,
        "entry": {"event": "Started"},
        "steps": [{"id": "hello", "kind": "send", "channel": channel,
                   "template": template or {"subject": "Hi", "body": "Hello {{ profile.name }}"}}],
    }  # fmt: skip


def _channels(provider: Provider, **extra: Any) -> dict:
    settings = Settings(**provider_settings(provider), provider_timeout=1, **extra)
    return build_channels(settings)


async def test_sms_through_an_outage_and_a_timeout_is_delivered_once(db, ts_env, provider):
    provider.fail_next = 2  # two 503s
    async with engine(db, ts_env, channels=_channels(provider)) as eng:
        await eng.publish(_journey("sms", "sms"))
        await eng.send(identify("ann", name="Ann", phone="+15550001000"))
        await eng.send(track("ann", "Started"))
        await eng.result(await eng.run("sms", "ann"))
        (row,) = await eng.messages("ann")
        (sent,) = provider.by_kind("sms")
        assert (row["status"], row["attempts"], row["address"]) == ("sent", 3, "+15550001000")
        assert row["provider_id"] == sent["sid"] and sent["Body"] == "Hello Ann"
        assert sent["key"] == row["idempotency_key"]

        # The provider takes the message, then answers too late: the retry gets the first
        # answer for the same key, and nothing is delivered twice.
        provider.hang_next, provider.hang_seconds = 1, 2.5
        await eng.send(identify("bob", name="Bob", phone="+15550002000"))
        await eng.send(track("bob", "Started"))
        await eng.result(await eng.run("sms", "bob"))
        (row,) = await eng.messages("bob")
        assert (row["status"], row["attempts"]) == ("sent", 2)
        assert [d["To"] for d in provider.by_kind("sms")] == ["+15550001000", "+15550002000"]
        assert row["provider_id"] == provider.by_kind("sms")[1]["sid"]


async def test_rate_limit_backs_off_instead_of_failing(db, ts_env, provider):
    provider.busy_next = 1  # and the provider itself says 429 once
    rates = RateLimits({"sms": 1})
    async with engine(db, ts_env, channels=_channels(provider), rates=rates) as eng:
        await eng.publish(_journey("sms", "sms"))
        users = ["r1", "r2", "r3"]
        for i, u in enumerate(users):
            await eng.send(identify(u, name=u, phone=f"+1555000300{i}"))
        await eng.send(*[track(u, "Started") for u in users])
        for u in users:
            await eng.result(await eng.run("sms", u))
        rows = [(await eng.messages(u))[0] for u in users]
        assert [r["status"] for r in rows] == ["sent"] * 3
        assert len(provider.by_kind("sms")) == 3
        times = sorted(r["sent_at"] for r in rows)
        assert (times[-1] - times[0]).total_seconds() >= 1.5  # 1 message/s: 3 take ≥ 2 windows


async def test_fallback_list_takes_the_first_reachable_channel(db, ts_env, provider):
    async with engine(db, ts_env, channels=_channels(provider)) as eng:
        await eng.publish(_journey("fb", ["push", "sms", "in_app"]))
        await eng.send(identify("pushy", name="P", push_token="dev-1", phone="+15550004000"))
        await eng.send(identify("texty", name="T", phone="+15550005000"))
        await eng.send(identify("stopped", name="S", phone="+15550006000"))
        await eng.send(identify("nobody", name="N"))
        cid = await eng.customer("stopped")
        await db.execute(  # an SMS STOP: every SMS topic
            "INSERT INTO subscriptions (customer_id, channel, topic, status, source) "
            "VALUES ($1, 'sms', '*', 'unsubscribed', 'sms_keyword')",
            cid,
        )
        users = ["pushy", "texty", "stopped", "nobody"]
        await eng.send(*[track(u, "Started") for u in users])
        results = {}
        for u in users:
            await eng.result(await eng.run("fb", u))
            (row,) = await eng.messages(u)
            results[u] = (row["channel"], row["status"])
        assert results == {
            "pushy": ("push", "sent"),
            "texty": ("sms", "sent"),
            "stopped": ("in_app", "sent"),
            "nobody": ("in_app", "sent"),
        }
        assert [d["token"] for d in provider.by_kind("push")] == ["dev-1"]
        assert [d["To"] for d in provider.by_kind("sms")] == ["+15550005000"]


async def test_fallback_with_no_reachable_channel_is_skipped_with_the_first_reason(
    db, ts_env, provider
):
    async with engine(db, ts_env, channels=_channels(provider)) as eng:
        await eng.publish(_journey("fb2", ["sms", "push"]))
        await eng.send(identify("far", name="F"))
        await eng.send(track("far", "Started"))
        await eng.result(await eng.run("fb2", "far"))
        (row,) = await eng.messages("far")
        assert (row["channel"], row["status"], row["skip_reason"]) == (
            "sms",
            "skipped",
            "no_address",
        )
        assert provider.deliveries == []


async def test_best_picks_the_channel_the_customer_engages_with(db, ts_env, provider):
    async with engine(db, ts_env, channels=_channels(provider)) as eng:
        await eng.publish(_journey("best", "best"))
        for u in ("reader", "fresh"):
            await eng.send(identify(u, name=u, phone="+15550007000", push_token=f"t-{u}"))
        cid = await eng.customer("reader")
        for i, (channel, engaged) in enumerate([("sms", True), ("sms", True), ("push", False)]):
            await db.execute(
                "INSERT INTO messages (idempotency_key, customer_id, channel, body, status, "
                "clicked_at) VALUES ($1, $2, $3, 'old', 'sent', CASE WHEN $4 THEN now() END)",
                f"old-{i}", cid, channel, engaged,
            )  # fmt: skip
        await eng.send(track("reader", "Started"), track("fresh", "Started"))
        await eng.result(await eng.run("best", "reader"))
        await eng.result(await eng.run("best", "fresh"))
        assert [m["channel"] for m in await eng.messages("reader")][-1] == "sms"
        # No engagement yet: the default order (email, push, sms, in-app); no email address.
        assert [m["channel"] for m in await eng.messages("fresh")] == ["push"]


async def test_push_to_an_unregistered_token_bounces_and_suppresses(db, ts_env, provider):
    async with engine(db, ts_env, channels=_channels(provider)) as eng:
        await eng.publish(_journey("p", "push"))
        await eng.send(identify("gone", name="G", push_token=UNREGISTERED))
        await eng.send(track("gone", "Started"))
        await eng.result(await eng.run("p", "gone"))
        (row,) = await eng.messages("gone")
        assert (row["status"], row["skip_reason"]) == ("bounced", "hard_bounce")
        reason = await db.fetchval(
            "SELECT reason FROM suppressions WHERE channel = 'push' AND address = $1",
            UNREGISTERED,
        )
        assert reason == "hard_bounce"
        bounced = await db.fetchrow("SELECT * FROM events WHERE event = 'Message Bounced'")
        assert bounced["payload"]["properties"]["message_id"] == row["id"]


async def test_webhook_channel_posts_signed_json(db, ts_env, provider):
    async with engine(db, ts_env, channels=_channels(provider)) as eng:
        await eng.publish(_journey("wh", "webhook"))
        await eng.send(identify("hooked", name="H"))
        await eng.send(track("hooked", "Started"))
        await eng.result(await eng.run("wh", "hooked"))
        (row,) = await eng.messages("hooked")
        (sent,) = provider.by_kind("webhook")  # the provider checked the signature
        assert row["status"] == "sent"
        assert sent["body"]["body"] == "Hello H" and sent["body"]["id"] == row["idempotency_key"]


async def test_in_app_messages_are_read_from_the_inbox(db, pg_url, ts_env, provider):
    async with (
        engine(db, ts_env, channels=_channels(provider)) as eng,
        admin_api(eng, pg_url) as api,
    ):
        await eng.publish(_journey("inapp", "in_app", subject="New", body="Hi {{ profile.name }}",
                                   html="<p>Hi {{ profile.name }}</p>"))  # fmt: skip
        await eng.send(identify("ina", name="Ina"), identify("other", name="O"))
        await eng.send(track("ina", "Started"))
        await eng.result(await eng.run("inapp", "ina"))
        page = (await api.get("/v1/customers/ina/inbox", headers=ADMIN)).json()
        assert page["unread"] == 1
        (item,) = page["items"]
        assert (item["subject"], item["body"], item["html"]) == ("New", "Hi Ina", "<p>Hi Ina</p>")
        assert item["read_at"] is None
        r = await api.post(f"/v1/customers/other/inbox/{item['id']}/read", headers=ADMIN)
        assert r.status_code == 404 and "message_id" in r.json()["message"]
        r = await api.post(f"/v1/customers/ina/inbox/{item['id']}/read", headers=ADMIN)
        assert r.status_code == 200 and r.json()["read_at"]
        page = (await api.get("/v1/customers/ina/inbox?unread_only=true", headers=ADMIN)).json()
        assert page == {"items": [], "unread": 0, "next_before": None}
        assert (await api.get("/v1/customers/ina/inbox")).status_code == 401


async def test_a_send_renders_the_stored_template_version_it_was_published_with(db, ts_env):
    from store.templates import add_version, create_template

    async with db.acquire() as conn:
        body = "One {{ profile.name }}"
        await create_template(conn, "note", channel="in_app", subject="v1", body=body)
    async with engine(db, ts_env, channels=build_channels(Settings())) as eng:
        await eng.publish(_journey("stored", "in_app", ref="note"))  # pins version 1
        async with db.acquire() as conn:
            await add_version(conn, "note", subject="v2", body="Two {{ profile.name }}")
        await eng.send(identify("tpl", name="Tia"))
        await eng.send(track("tpl", "Started"))
        await eng.result(await eng.run("stored", "tpl"))
        (row,) = await eng.messages("tpl")
        assert (row["subject"], row["body"]) == ("v1", "One Tia")
        assert (row["template_id"], row["template_version"]) == ("note", 1)


async def test_channel_report_counts_what_each_step_and_channel_achieved(
    db, pg_url, ts_env, provider
):
    journey = _journey("rep", ["sms", "in_app"])
    journey["steps"].append(
        {"id": "again", "kind": "send", "channel": "sms", "category": "transactional",
         "template": {"body": "Again"}}
    )  # fmt: skip
    async with (
        engine(db, ts_env, channels=_channels(provider)) as eng,
        admin_api(eng, pg_url) as api,
    ):
        await eng.publish(journey)
        await eng.send(
            identify("t1", name="A", phone="+15550008001"),
            identify("t2", name="B", phone=INVALID_NUMBER),
            identify("t3", name="C"),
        )
        await eng.send(*[track(u, "Started") for u in ("t1", "t2", "t3")])
        for u in ("t1", "t2", "t3"):
            await eng.result(await eng.run("rep", u))
        (inbox,) = (await api.get("/v1/customers/t3/inbox", headers=ADMIN)).json()["items"]
        await api.post(f"/v1/customers/t3/inbox/{inbox['id']}/read", headers=ADMIN)
        r = await api.get("/v1/journeys/rep/channels", headers=ADMIN)
        assert r.status_code == 200
        got = {(s["step_id"], s["channel"]): s for s in r.json()["steps"]}
        assert set(got) == {("hello", "sms"), ("hello", "in_app"), ("again", "sms")}
        hello_sms = got["hello", "sms"]
        assert (hello_sms["messages"], hello_sms["sent"], hello_sms["bounced"]) == (2, 1, 1)
        assert hello_sms["bounce_rate"] == 0.5
        hello_app = got["hello", "in_app"]
        assert (hello_app["sent"], hello_app["read"]) == (1, 1)
        again = got["again", "sms"]  # t2's number is suppressed now; t3 has none
        assert (again["sent"], again["skipped"]) == (1, {"suppressed": 1, "no_address": 1})
        missing = await api.get("/v1/journeys/nope/channels", headers=ADMIN)
        assert missing.status_code == 404 and "journey_id" in missing.json()["message"]


async def test_a_variant_gives_a_channel_its_own_content(db, ts_env, provider):
    from store.journeys import DefinitionError, parse_definition
    from store.templates import create_template

    async with db.acquire() as conn:
        body = "{{ profile.name }}: 50% off"
        await create_template(conn, "short", channel="push", subject="Sale", body=body)
    journey = _journey("var", ["email", "sms", "push"], subject="Our sale", body="Long email text",
                       html="<p>Long email</p>")  # fmt: skip
    journey["steps"][0]["variants"] = {
        "sms": {"body": "SALE {{ profile.name }}: 50% off today"},
        "push": {"ref": "short"},
    }
    async with engine(db, ts_env, channels=_channels(provider)) as eng:
        await eng.publish(journey)
        await eng.send(identify("v1", name="Vi", phone="+15550009100"))
        await eng.send(identify("v2", name="Wu", push_token="tok-v2"))
        await eng.send(track("v1", "Started"), track("v2", "Started"))
        await eng.result(await eng.run("var", "v1"))
        await eng.result(await eng.run("var", "v2"))
        (sms,) = provider.by_kind("sms")
        assert sms["Body"] == "SALE Vi: 50% off today"
        (push,) = provider.by_kind("push")
        assert push["notification"] == {"title": "Sale", "body": "Wu: 50% off"}
        (row,) = await eng.messages("v2")
        assert (row["template_id"], row["template_version"], row["html"]) == ("short", 1, None)

    bad = _journey("bad", ["email", "sms"])
    bad["steps"][0]["variants"] = {"push": {"body": "x"}}
    with pytest.raises(
        DefinitionError, match=r"variants\.push \(step 'hello'\): the step does not"
    ):
        parse_definition(bad)
    bad["steps"][0]["variants"] = {"sms": {"body": "{{ user.name }}"}}
    with pytest.raises(
        DefinitionError, match=r"variants\.sms\.body \(step .hello.\): unknown template variable"
    ):
        parse_definition(bad)


async def test_a_stop_while_a_send_waits_out_an_outage_skips_it(db, dev_env, provider):
    provider.fail_next = 1000  # 503s: the provider certainly has nothing
    async with engine(db, dev_env, channels=_channels(provider)) as eng:
        await eng.publish(_journey("late", "sms"))
        await eng.send(identify("late", name="L", phone="+15550009300"))
        await eng.send(track("late", "Started"))
        cid = await eng.customer("late")

        async def failing() -> bool:
            return await db.fetchval(
                "SELECT status = 'pending' AND error IS NOT NULL FROM messages "
                "WHERE customer_id = $1",
                cid,
            )

        await eventually(failing, what="a send retrying through the outage")
        await db.execute(  # the customer texts STOP meanwhile
            "INSERT INTO subscriptions (customer_id, channel, topic, status, source) "
            "VALUES ($1, 'sms', '*', 'unsubscribed', 'sms_keyword')",
            cid,
        )
        provider.fail_next = 0
        await (await eng.run("late", "late")).result()
        (row,) = await eng.messages("late")
        assert (row["status"], row["skip_reason"]) == ("skipped", "no_consent")
        assert provider.deliveries == []


async def test_profile_data_is_escaped_in_html_parts(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish(_journey("esc", "in_app", body="Hi {{ profile.name }}",
                                   html="<p>Hi {{ profile.name }}</p>"))  # fmt: skip
        evil = '<a href="https://evil.example/login">Reset</a>'
        await eng.send(identify("esc", name=evil))
        await eng.send(track("esc", "Started"))
        await eng.result(await eng.run("esc", "esc"))
        (row,) = await eng.messages("esc")
        assert row["body"] == f"Hi {evil}"  # text stays text
        assert row["html"] == (
            "<p>Hi &lt;a href=&#34;https://evil.example/login&#34;&gt;Reset&lt;/a&gt;</p>"
        )
