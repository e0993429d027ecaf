"""A send (and a hand-off task) acts on the customer as they are under the contact lock, not on
a copy read before it: a send that waited out an erasure sends nothing and stores nothing of
them, one that waited out a merge decides for the survivor; and a retried send answers from its
reservation without rendering again, rendering only the content of the channel it goes out on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from temporalio.exceptions import ApplicationError

import activities.journey_activities as journey_activities
from activities.channels import build_channels
from activities.contact_policy import Cap, ContactPolicy
from activities.journey_activities import JourneyActivities
from core.outbound import OutboundPolicy
from core.settings import Settings
from models.journey import Template
from models.runtime import RunSummary, SendRequest, TaskRequest
from tests.conftest import eventually
from tests.harness import engine, identify, track
from tests.providers import Provider, provider_settings
from tests.receiver import Receiver


def _channels(provider: Provider) -> dict:
    return build_channels(Settings(**provider_settings(provider), provider_timeout=1))


@asynccontextmanager
async def _activities(
    db: asyncpg.Pool, provider: Provider, policy: ContactPolicy | None = None
) -> AsyncIterator[JourneyActivities]:
    acts = JourneyActivities(
        db,
        channels=_channels(provider),
        policy=policy or ContactPolicy([]),
        outbound=OutboundPolicy(allow_private=True),
    )
    try:
        yield acts
    finally:
        await acts.aclose()


def _send(key: str, customer_id: str, **over: Any) -> SendRequest:
    return SendRequest(
        **{
            "idempotency_key": key,
            "customer_id": customer_id,
            "journey_id": "j",
            "journey_version": 1,
            "step_id": "hello",
            "workflow_id": f"wf-{key}",
            "channel": "sms",
            "body": "Hello {{ profile.name }}",
            **over,
        }
    )


@asynccontextmanager
async def _holding_contact_lock(db: asyncpg.Pool, customer_id: str) -> AsyncIterator[Any]:
    """An open transaction holding the customer's contact lock, as an erasure or a merge does
    while it changes their rows; committed on leaving."""
    async with db.acquire() as conn, conn.transaction():
        await ContactPolicy([]).lock(conn, customer_id)
        yield conn


async def _blocked_on_contact_lock(db: asyncpg.Pool) -> bool:
    return await db.fetchval(
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND wait_event = 'advisory' AND query LIKE '%contact:%'"
    )


async def _erase_rows(conn: asyncpg.Connection, customer_id: str) -> None:
    """What store.erasure deletes of one customer (every row naming them, then the customer)."""
    for table in ("messages", "journey_runs", "identities", "subscriptions", "tasks", "events"):
        await conn.execute(f"DELETE FROM {table} WHERE customer_id = $1", customer_id)
    await conn.execute("DELETE FROM customers WHERE id = $1 OR merged_into = $1", customer_id)


async def _merge_rows(conn: asyncpg.Connection, loser: str, survivor: str) -> None:
    """What store.profiles merges (its lock on the loser is the one the test holds)."""
    await ContactPolicy([]).lock(conn, survivor)
    await conn.execute(
        "UPDATE customers s SET traits = l.traits || s.traits FROM customers l "
        "WHERE s.id = $2 AND l.id = $1",
        loser,
        survivor,
    )
    await conn.execute(
        "UPDATE messages SET customer_id = $2 WHERE customer_id = $1", loser, survivor
    )
    await conn.execute("UPDATE customers SET merged_into = $2 WHERE id = $1", loser, survivor)


async def test_a_send_that_waited_out_an_erasure_sends_and_keeps_nothing(db, dev_env, provider):
    async with engine(db, dev_env, channels=_channels(provider)) as eng:
        await eng.publish(
            {"id": "bye", "name": "bye", "entry": {"event": "Started"},
             "steps": [{"id": "hello", "kind": "send", "channel": "sms",
                        "template": {"body": "Hello {{ profile.name }}"}}]}
        )  # fmt: skip
        await eng.send(identify("gone", name="Gone", phone="+15550007000"))
        cid = await eng.customer("gone")
        handle = await eng.run("bye", "gone")
        async with _holding_contact_lock(db, cid) as conn:
            await eng.send(track("gone", "Started"))
            await eventually(lambda: _blocked_on_contact_lock(db), what="the send at the lock")
            await _erase_rows(conn, cid)
        await handle.result()
        summary = await handle.query("summary", result_type=RunSummary)
        assert summary.results["hello"]["status"] == "failed"
        assert "erased" in summary.results["hello"]["error"]
        assert provider.deliveries == []
        assert await db.fetch("SELECT customer_id, address, body FROM messages") == []


@pytest.mark.parametrize("refusal", ["capped", "no_consent"])
async def test_a_send_for_a_customer_merged_while_it_waited_decides_for_the_survivor(
    db, provider, refusal
):
    await db.execute(
        "INSERT INTO customers (id, traits) VALUES ('loser', $1), ('survivor', $2)",
        {"name": "Lo", "phone": "+15550008000"},
        {"name": "Su"},
    )
    if refusal == "capped":  # the survivor's slot is used; the loser's is free
        await db.execute(
            "INSERT INTO messages (idempotency_key, customer_id, channel, body, status, sent_at) "
            "VALUES ('earlier', 'survivor', 'sms', 'x', 'sent', now())"
        )
    else:  # the survivor said no to SMS; the loser said nothing (default: subscribed)
        await db.execute(
            "INSERT INTO subscriptions (customer_id, channel, topic, status, source) "
            "VALUES ('survivor', 'sms', 'marketing', 'unsubscribed', 'api')"
        )
    async with _activities(db, provider, ContactPolicy([Cap(1, timedelta(days=7))])) as acts:
        async with _holding_contact_lock(db, "loser") as conn:
            sending = asyncio.create_task(acts.send_message(_send("m1", "loser")))
            await eventually(lambda: _blocked_on_contact_lock(db), what="the send at the lock")
            await _merge_rows(conn, "loser", "survivor")
        result = await sending
    assert (result.status, result.reason) == ("skipped", refusal)
    row = await db.fetchrow(
        "SELECT customer_id, status FROM messages WHERE id = $1", result.message_id
    )
    assert (row["customer_id"], row["status"]) == ("survivor", "skipped")
    assert provider.deliveries == []


def _count_renders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every template part the send activity renders, by source."""
    seen: list[str] = []
    for name in ("render", "render_html"):
        original = getattr(journey_activities, name)

        def counting(source: str, ctx: dict[str, Any], _original=original, **kw: Any) -> str:
            seen.append(source)
            return _original(source, ctx, **kw)

        monkeypatch.setattr(journey_activities, name, counting)
    return seen


async def test_a_retried_send_answers_from_its_reservation_without_rendering(
    db, provider, monkeypatch
):
    await db.execute(
        "INSERT INTO customers (id, traits) VALUES ('r', $1)",
        {"name": "Ra", "phone": "+15550009000"},
    )
    renders = _count_renders(monkeypatch)
    provider.fail_next = 1  # a 503: the first attempt reserves, then fails
    async with _activities(db, provider) as acts:
        with pytest.raises(Exception):  # noqa: B017 (the provider's 503, retried by Temporal)
            await acts.send_message(_send("r1", "r"))
        assert renders == ["Hello {{ profile.name }}"]
        assert await db.fetchval("SELECT status FROM messages") == "pending"
        result = await acts.send_message(_send("r1", "r"))
    assert result.status == "sent"
    assert renders == ["Hello {{ profile.name }}"]  # the retry sent the stored body
    assert [d["Body"] for d in provider.by_kind("sms")] == ["Hello Ra"]


async def test_a_send_renders_only_the_content_of_the_channel_it_chooses(db, provider, monkeypatch):
    await db.execute(
        "INSERT INTO customers (id, traits) VALUES ('v', $1)",
        {"name": "Vi", "phone": "+15550009100"},
    )
    renders = _count_renders(monkeypatch)
    variants = {"sms": Template(body="SMS {{ profile.name }}"),
                "push": Template(body="PUSH {{ profile.name }}")}  # fmt: skip
    req = _send("v1", "v", channel="email", channels=["email", "push", "sms"], subject="Subj",
                body="Email", html="<p>Email</p>", variants=variants)  # fmt: skip
    async with _activities(db, provider) as acts:
        result = await acts.send_message(req)
    assert (result.status, result.channel) == ("sent", "sms")
    assert renders == ["SMS {{ profile.name }}"]
    assert [d["Body"] for d in provider.by_kind("sms")] == ["SMS Vi"]


async def test_a_task_that_waited_out_an_erasure_is_not_created(db, provider, receiver):
    await db.execute(
        "INSERT INTO customers (id, traits) VALUES ('t', $1)", {"name": "Ta", "phone": "+1555"}
    )
    req = TaskRequest(
        idempotency_key="t1", customer_id="t", journey_id="j", step_id="call",
        workflow_id="wf-t", enrollment_id="e-t", queue="sales", title="Call {{ profile.name }}",
        details={"phone": "{{ profile.phone }}"}, notify_url=f"{receiver}/ok",
    )  # fmt: skip
    async with _activities(db, provider) as acts:
        async with _holding_contact_lock(db, "t") as conn:
            creating = asyncio.create_task(acts.create_task(req))
            await eventually(lambda: _blocked_on_contact_lock(db), what="the task at the lock")
            await _erase_rows(conn, "t")
        with pytest.raises(ApplicationError) as raised:
            await creating
    assert raised.value.type == "CustomerErased" and raised.value.non_retryable
    assert await db.fetch("SELECT * FROM tasks") == []
    assert Receiver.calls == []


async def test_a_task_for_a_merged_away_customer_belongs_to_the_survivor(db, provider):
    await db.execute(
        "INSERT INTO customers (id, traits) VALUES ('tl', $1), ('ts', $2)",
        {"name": "Lo"},
        {"name": "Su"},
    )
    req = TaskRequest(
        idempotency_key="t2", customer_id="tl", journey_id="j", step_id="call",
        workflow_id="wf-t", enrollment_id="e-t", queue="sales", title="Call {{ profile.name }}",
        details={},
    )  # fmt: skip
    async with _activities(db, provider) as acts:
        async with _holding_contact_lock(db, "tl") as conn:
            creating = asyncio.create_task(acts.create_task(req))
            await eventually(lambda: _blocked_on_contact_lock(db), what="the task at the lock")
            await _merge_rows(conn, "tl", "ts")
        created = await creating
    row = await db.fetchrow("SELECT customer_id, title FROM tasks WHERE id = $1", created.task_id)
    assert (row["customer_id"], row["title"]) == ("ts", "Call Su")
