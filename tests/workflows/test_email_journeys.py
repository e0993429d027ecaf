"""A journey sending real email through the SMTP channel to a local aiosmtpd server."""

from __future__ import annotations

from activities.channels import StoredChannel
from activities.channels.email import EmailChannel, message_id_for
from tests.conftest import eventually
from tests.harness import ADMIN, admin_api, engine, identify, track

JOURNEY = {
    "id": "mail",
    "name": "Mail",
    "entry": {"event": "Started"},
    "steps": [
        {"id": "hello", "kind": "send", "channel": "email",
         "template": {"subject": "Hi {{ profile.first_name }}", "body": "Welcome!"}},
    ],
}  # fmt: skip


def _channels(port: int) -> dict:
    mail = EmailChannel(host="127.0.0.1", port=port, sender="Shop <news@shop.example>",
                        sender_domain="shop.example", timeout=5)  # fmt: skip
    return {"outbox": StoredChannel("outbox"), "email": mail}


async def test_email_is_sent_once_with_a_message_id_from_its_key(db, ts_env, smtp):
    recorder, port = smtp
    async with engine(db, ts_env, channels=_channels(port)) as eng:
        await eng.publish(JOURNEY)
        await eng.send(identify("em", email="Em@Example.com", first_name="Em"))
        await eng.send(track("em", "Started"))
        await eng.result(await eng.run("mail", "em"))
        (row,) = await eng.messages("em")
        assert (row["status"], row["address"]) == ("sent", "em@example.com")
        (mail,) = recorder.messages()
        assert mail["To"] == "em@example.com"
        assert mail["Subject"] == "Hi Em"
        assert mail["Message-ID"] == message_id_for(row["idempotency_key"], "shop.example")


async def test_a_hard_bounce_suppresses_the_address(db, ts_env, smtp):
    recorder, port = smtp
    async with engine(db, ts_env, channels=_channels(port)) as eng:
        await eng.publish(JOURNEY)
        await eng.send(identify("gone", email="gone@example.com", first_name="G"))
        await eng.send(identify("none", first_name="N"))  # no address on the channel
        await eng.send(track("gone", "Started"), track("none", "Started"))
        await eng.result(await eng.run("mail", "gone"))
        await eng.result(await eng.run("mail", "none"))
        (bounced,) = await eng.messages("gone")
        assert (bounced["status"], bounced["skip_reason"]) == ("bounced", "hard_bounce")
        assert bounced["error"].startswith("550 for gone@example.com")
        assert (
            await db.fetchval(
                "SELECT reason FROM suppressions WHERE channel = 'email' AND address = $1",
                "gone@example.com",
            )
            == "hard_bounce"
        )
        (skipped,) = await eng.messages("none")
        assert (skipped["status"], skipped["skip_reason"]) == ("skipped", "no_address")
        await eng.send(track("gone", "Started"))  # the next time: suppressed, not tried
        await eng.result(await eng.run("mail", "gone"))
        assert [m["skip_reason"] for m in await eng.messages("gone")] == [
            "hard_bounce", "suppressed",
        ]  # fmt: skip
        assert recorder.messages() == []


async def test_one_click_unsubscribe_stops_the_next_email(db, pg_url, dev_env, smtp):
    recorder, port = smtp
    links = ("http://api", "dev-link-secret")
    async with (
        engine(db, dev_env, channels=_channels(port), links=links) as eng,
        admin_api(eng, pg_url) as api,
    ):
        await eng.publish(JOURNEY)
        await eng.send(identify("uns", email="uns@example.com", first_name="U"))
        await eng.send(track("uns", "Started"))
        await (await eng.run("mail", "uns")).result()
        (mail,) = recorder.messages()
        url = mail["List-Unsubscribe"].strip("<>")
        # Raw, unfolded and not encoded: mail clients read the URL as it stands.
        assert f"List-Unsubscribe: <{url}>\r\n".encode() in recorder.envelopes[0].content
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        path = url.removeprefix("http://api")
        page = await api.get(path)  # a link scanner: changes nothing
        assert page.status_code == 200
        assert "Unsubscribe" in page.text
        assert (await api.get("/v1/customers/uns/subscriptions", headers=ADMIN)).json() == []
        forged = path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB")
        assert (await api.post(forged)).status_code == 400
        assert (await api.post(path, data={"List-Unsubscribe": "One-Click"})).status_code == 200
        subs = (await api.get("/v1/customers/uns/subscriptions", headers=ADMIN)).json()
        assert subs == [
            {"channel": "email", "topic": "marketing", "status": "unsubscribed", "source": "link"}
        ]
        await eng.send(track("uns", "Started"))
        await (await eng.run("mail", "uns")).result()
        assert [m["skip_reason"] for m in await eng.messages("uns")] == [None, "no_consent"]
        assert len(recorder.messages()) == 1


ENGAGE = {
    "id": "engage",
    "name": "Engage",
    "entry": {"event": "Started"},
    "steps": [
        {"id": "offer", "kind": "send", "channel": "email",
         "template": {"subject": "Offer", "body": "See https://shop.example/sale?x=1 now",
                      "html": "<html><body><p><a href=\"https://shop.example/sale?x=1\">Sale</a>"
                              "</p></body></html>"}},
        {"id": "seen", "kind": "wait_for", "timeout": "3d",
         "events": [{"type": "track", "event": "Email Link Clicked", "next": "thanks"}],
         "on_timeout": "exit"},
        {"id": "thanks", "kind": "send", "channel": "email",
         "template": {"subject": "Thanks", "body": "Glad you looked"}},
        {"id": "exit", "kind": "exit"},
    ],
}  # fmt: skip


def _hrefs(html: str) -> list[str]:
    import re

    return re.findall(r'(?:href|src)="([^"]+)"', html)


async def test_html_email_with_tracked_links_and_a_journey_waiting_for_the_click(
    db, pg_url, dev_env, smtp
):
    recorder, port = smtp
    links = ("http://api", "dev-link-secret")
    async with (
        engine(db, dev_env, channels=_channels(port), links=links) as eng,
        admin_api(eng, pg_url) as api,
    ):
        await eng.publish(ENGAGE)
        await eng.send(identify("eng", email="eng@example.com", first_name="E"))
        await eng.send(track("eng", "Started"))
        run = await eng.run("engage", "eng")

        async def delivered() -> bool:
            return len(recorder.messages()) == 1

        await eventually(delivered, what="the offer email")
        (mail,) = recorder.messages()
        text = mail.get_body(("plain",)).get_content()
        html = mail.get_body(("html",)).get_content()
        assert "https://shop.example/sale" not in text + html  # every link is tracked
        click, pixel = _hrefs(html)
        assert click.startswith("http://api/v1/t/c/") and pixel.startswith("http://api/v1/t/o/")
        assert click in text
        opened = await api.get(pixel.removeprefix("http://api"))
        assert (opened.status_code, opened.headers["content-type"]) == (200, "image/gif")
        r = await api.get(click.removeprefix("http://api"))
        assert (r.status_code, r.headers["location"]) == (302, "https://shop.example/sale?x=1")
        (offer,) = await eng.messages("eng")
        assert offer["opened_at"] and offer["clicked_at"]
        assert offer["links"] == ["https://shop.example/sale?x=1"]
        names = await db.fetch("SELECT event FROM events WHERE event LIKE 'Email %' ORDER BY id")
        assert [n["event"] for n in names] == ["Email Opened", "Email Link Clicked"]
        while await eng.router.route_once():  # the API stored them; route them to the run
            pass
        result = await run.result()
        assert result.steps == ["offer", "seen", "thanks", "exit"]
        assert [m["subject"] for m in recorder.messages()] == ["Offer", "Thanks"]
