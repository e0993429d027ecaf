"""Operator actions reach the run a customer is in now, whatever execution it is at, and never
hang on a run that cannot make progress (dev server, in-process engine and API)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from activities.channels import StoredChannel
from activities.channels.email import EmailChannel
from models.runtime import JourneyRunResult, RunSummary
from tests.conftest import eventually
from tests.harness import ADMIN, Engine, admin_api, engine, identify, track
from tests.smtp import Recorder, free_port

# Listens for Ping and answers each one: every round adds history, so a small history limit
# makes the run continue-as-new after a few pings.
PINGER = {
    "id": "pinger",
    "name": "Pinger",
    "entry": {"event": "Started"},
    "steps": [
        {"id": "listen", "kind": "wait_for", "timeout": "30d",
         "events": [{"event": "Ping", "next": "reply"}]},
        {"id": "reply", "kind": "send", "template": {"body": "pong"}},
        {"id": "again", "kind": "goto", "target": "listen", "max_iterations": 100},
    ],
}  # fmt: skip


@pytest.fixture
async def small_history(db, pg_url: str, dev_env) -> Any:
    """The engine with a history limit that forces continue-as-new within a few events."""
    async with (
        engine(db, dev_env, history_limit=40) as eng,
        admin_api(eng, pg_url) as api,
    ):
        await eng.publish(PINGER)
        yield eng, api


async def _continued(eng: Engine, user: str) -> str:
    """Ping until the run has continued-as-new; returns the stored (first) run id."""
    await eng.send(identify(user), track(user, "Started"))
    cid = await eng.customer(user)
    first = await eng.pool.fetchval(
        "SELECT run_id FROM journey_runs WHERE customer_id = $1 AND status = 'running'", cid
    )
    assert first
    handle = await eng.run("pinger", user)
    pings = 0

    async def moved_on() -> bool:
        nonlocal pings
        if (await handle.describe()).run_id != first:
            return True
        if pings < 30:
            pings += 1
            await eng.send(track(user, "Ping"))
        return False

    await eventually(moved_on, within=60, what="continue-as-new")
    # One more round in the new execution, so it differs from the first one's last state.
    pongs = await _pongs(eng, user)
    await eng.send(track(user, "Ping"))

    async def answered() -> bool:
        return await _pongs(eng, user) > pongs and await _at(handle, "listen")

    await eventually(answered, what=f"{user} answered in the new execution")
    return first


async def _at(handle: Any, step: str) -> bool:
    summary = await handle.query("summary", result_type=RunSummary)
    return summary.step_id == step


async def _pongs(eng: Engine, user: str) -> int:
    return sum(m["body"] == "pong" for m in await eng.messages(user))


async def test_pause_exit_reaches_a_run_that_continued_as_new(small_history):
    eng, api = small_history
    first = await _continued(eng, "can1")
    r = await api.post("/v1/journeys/pinger/pause", json={"in_flight": "exit"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["runs_affected"] == 1
    handle = await eng.run("pinger", "can1")
    result = await handle.result()
    assert result.status == "exited"
    before = await _pongs(eng, "can1")
    await eng.send(track("can1", "Ping"))
    assert await _pongs(eng, "can1") == before
    row = await eng.pool.fetchrow(
        "SELECT status, run_id FROM journey_runs WHERE customer_id = $1",
        await eng.customer("can1"),
    )
    assert row["status"] == "exited"
    assert row["run_id"] == first  # the first execution's id is kept (history read-out)


async def test_steer_and_live_view_reach_a_run_that_continued_as_new(small_history):
    eng, api = small_history
    await _continued(eng, "can2")
    runs = (await api.get("/v1/customers/can2/journeys", headers=ADMIN)).json()
    assert [(r["status"], r["current_step"]) for r in runs] == [("running", "listen")]
    live = await (await eng.run("pinger", "can2")).query("summary", result_type=RunSummary)
    assert len(runs[0]["history"]) == len(live.history)  # the current execution's view
    r = await api.post(
        "/v1/customers/can2/journeys/pinger/steer",
        json={"action": "exit", "reason": "support"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "exited"
    result = await (await eng.run("pinger", "can2")).result()
    assert (result.status, result.exit_reason) == ("exited", "operator: support")


# -- a provider that is down -------------------------------------------------------------

MAILER = {
    "id": "mailer",
    "name": "Mailer",
    "entry": {"event": "Started"},
    "steps": [
        {"id": "hello", "kind": "send", "channel": "email",
         "template": {"subject": "Hello", "body": "hello"}},
        {"id": "long_wait", "kind": "wait", "duration": "30d"},
        {"id": "later", "kind": "send", "template": {"body": "later"}},
    ],
}  # fmt: skip


@pytest.fixture
async def provider_down(db, pg_url: str, dev_env) -> Any:
    """An engine whose email provider is down (a closed port); `up()` starts it there."""
    port = free_port()
    mail = EmailChannel(host="127.0.0.1", port=port, sender="Shop <news@shop.example>",
                        sender_domain="shop.example", timeout=5)  # fmt: skip
    recorder = Recorder()
    controllers: list[Controller] = []

    def up() -> Recorder:
        controller = Controller(recorder, hostname="127.0.0.1", port=port)
        controller.start()
        controllers.append(controller)
        return recorder

    channels = {"outbox": StoredChannel("outbox"), "email": mail}
    try:
        async with (
            engine(db, dev_env, channels=channels) as eng,
            admin_api(eng, pg_url) as api,
        ):
            await eng.publish(MAILER)
            yield eng, api, up
    finally:
        for c in controllers:
            c.stop()


async def _sending(eng: Engine, customer_id: str) -> bool:
    """The run is in its email send, which keeps failing (the provider is down)."""
    return bool(
        await eng.pool.fetchval(
            "SELECT count(*) FROM messages WHERE customer_id = $1 AND channel = 'email' "
            "AND status IN ('pending', 'sending') AND error IS NOT NULL",
            customer_id,
        )
    )


def _anon(anon: str, kind: str = "identify", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "anonymousId": anon, "messageId": f"m-{uuid.uuid4()}", **fields}


async def test_a_merge_does_not_wait_for_a_run_stuck_in_a_send(provider_down):
    eng, _api, up = provider_down
    # Two profiles of one person, each in the journey, each stuck sending its email.
    await eng.send(identify("dup", email="dup@example.com"), track("dup", "Started"))
    await eng.send(
        _anon("anon-dup", traits={"email": "dup2@example.com"}),
        _anon("anon-dup", "track", event="Started"),
    )
    survivor = await eng.customer("dup")
    loser = await eng.customer("anon-dup")
    for cid in (survivor, loser):
        await eventually(lambda cid=cid: _sending(eng, cid), what="a send retrying")
    duplicate = eng.client.get_workflow_handle(
        f"journey-mailer-{loser}", result_type=JourneyRunResult
    )
    # The merge routes at once, and routing goes on for everyone else meanwhile.
    merge = {"type": "identify", "userId": "dup", "anonymousId": "anon-dup",
             "messageId": f"m-{uuid.uuid4()}"}  # fmt: skip
    await asyncio.wait_for(eng.send(merge, identify("other", x=1)), timeout=30)
    assert await eng.customer("anon-dup") == survivor
    # Once the provider is back, the in-flight send completes and the duplicate run exits.
    recorder = up()
    result = await asyncio.wait_for(duplicate.result(), timeout=120)
    assert result.status == "exited"
    assert result.exit_reason == f"operator: merged into {survivor}"
    assert sorted(m["To"] for m in recorder.messages()) == ["dup2@example.com", "dup@example.com"]


async def test_pause_with_exit_does_not_hang_on_a_run_stuck_in_a_send(provider_down):
    eng, api, up = provider_down
    await eng.send(identify("stuck", email="stuck@example.com"), track("stuck", "Started"))
    cid = await eng.customer("stuck")
    await eventually(lambda: _sending(eng, cid), what="a send retrying")
    r = await asyncio.wait_for(
        api.post("/v1/journeys/mailer/pause", json={"in_flight": "exit"}, headers=ADMIN),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["runs_affected"] == 1
    up()
    handle = await eng.run("mailer", "stuck")
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert result.status == "exited"
    # The send in flight went out; nothing after the exit did.
    assert [m["body"] for m in await eng.messages("stuck")] == ["hello"]


async def test_archive_with_exit_does_not_hang_either(provider_down):
    eng, api, up = provider_down
    await eng.send(identify("arch", email="arch@example.com"), track("arch", "Started"))
    cid = await eng.customer("arch")
    await eventually(lambda: _sending(eng, cid), what="a send retrying")
    r = await asyncio.wait_for(
        api.post("/v1/journeys/mailer/archive", json={"in_flight": "exit"}, headers=ADMIN),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["runs_affected"] == 1
    up()
    handle = await eng.run("mailer", "arch")
    result = await asyncio.wait_for(handle.result(), timeout=120)
    assert result.status == "exited"
