"""A journey cannot make the worker call into our own network: with private addresses
refused, a webhook step or a hand-off notification pointed at a loopback service (here the
`receiver`, standing in for the API or the Temporal UI on 127.0.0.1) fails that step at once,
non-retryably, and nothing reaches the service; with them allowed the same step works. Hand-off
notifications are signed like webhook steps."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.signing import BadSignature, verify_signature
from core.outbound import OutboundPolicy
from models.runtime import RunSummary
from tests.harness import Engine, engine, identify, track
from tests.receiver import Receiver
from worker import build_worker

GUARD_ON = OutboundPolicy(allow_private=False)
ALLOW_PRIVATE = OutboundPolicy(allow_private=True)


@contextlib.asynccontextmanager
async def guarded_engine(
    pool: asyncpg.Pool, env: WorkflowEnvironment, policy: OutboundPolicy
) -> AsyncIterator[Engine]:
    """tests.harness.engine with the worker's outbound policy chosen by the test (the
    suite's own default allows private addresses, as JOURNEYS_ENV=test does)."""
    eng = Engine(pool, env, f"tq-{uuid.uuid4().hex[:8]}")
    try:
        async with build_worker(env.client, pool, eng.task_queue, outbound=policy):
            yield eng
    finally:
        live = (
            "SELECT DISTINCT workflow_id FROM journey_runs WHERE status IN ('starting','running')"
        )
        for row in await pool.fetch(live):
            with contextlib.suppress(RPCError):
                await env.client.get_workflow_handle(row["workflow_id"]).terminate("test ended")


def _hook(url: str) -> dict[str, Any]:
    return {
        "id": "hook",
        "name": "hook",
        "entry": {"event": "Started"},
        "steps": [
            {"id": "admin", "kind": "webhook", "url": url,
             "next": "done", "on_error": "refused"},
            {"id": "done", "kind": "send", "template": {"body": "ok"}, "next": "end"},
            {"id": "refused", "kind": "send", "template": {"body": "refused"}},
        ],
    }  # fmt: skip


def _handoff(url: str) -> dict[str, Any]:
    return {
        "id": "vip",
        "name": "vip",
        "entry": {"event": "Started"},
        "steps": [
            {"id": "call", "kind": "handoff", "queue": "sales", "title": "Call {{ profile.name }}",
             "notify_url": url, "next": "done", "on_error": "refused"},
            {"id": "done", "kind": "send", "template": {"body": "ok"}, "next": "end"},
            {"id": "refused", "kind": "send", "template": {"body": "refused"}},
        ],
    }  # fmt: skip


async def _run(eng: Engine, journey: str, ref: str) -> tuple[list[str], dict[str, Any], int]:
    """(steps, results, attempts of the step's activity)."""
    await eng.send(identify(ref, name=ref.title()), track(ref, "Started"))
    handle = await eng.run(journey, ref)
    result = await eng.result(handle)
    summary = await handle.query("summary", result_type=RunSummary)
    attempts = 0
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_started_event_attributes"):
            attempts = max(attempts, event.activity_task_started_event_attributes.attempt)
    return result.steps, summary.results, attempts


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433"])
async def test_a_webhook_to_loopback_is_refused_at_once(db, ts_env, receiver, host):
    url = receiver.replace("127.0.0.1", host) + "/v1/journeys"
    async with guarded_engine(db, ts_env, GUARD_ON) as eng:
        await eng.publish(_hook(url))
        steps, results, attempts = await _run(eng, "hook", "ann")
    assert steps == ["admin", "refused"]
    assert results["admin"]["ok"] is False and results["admin"]["status"] is None
    assert "loopback" in results["admin"]["error"]
    assert "OUTBOUND_ALLOW_PRIVATE" in results["admin"]["error"]
    assert attempts == 1  # non-retryable: no backoff loop against a refused address
    assert Receiver.calls == []


async def test_the_same_webhook_works_when_private_addresses_are_allowed(db, ts_env, receiver):
    async with guarded_engine(db, ts_env, ALLOW_PRIVATE) as eng:
        await eng.publish(_hook(f"{receiver}/v1/journeys"))
        steps, results, _ = await _run(eng, "hook", "bob")
    assert steps == ["admin", "done"]
    assert results["admin"]["ok"] is True and results["admin"]["status"] == 200
    assert len(Receiver.calls) == 1


async def test_a_handoff_notification_to_loopback_is_refused_and_recorded(db, ts_env, receiver):
    async with guarded_engine(db, ts_env, GUARD_ON) as eng:
        await eng.publish(_handoff(f"{receiver}/notify"))
        steps, results, attempts = await _run(eng, "vip", "cy")
    assert steps == ["call", "refused"]
    notify = results["call"]["notify"]
    assert notify["ok"] is False and notify["status"] is None
    assert "refused" in notify["error"] and "loopback" in notify["error"]
    assert attempts == 1
    assert Receiver.calls == []
    assert await db.fetchval("SELECT count(*) FROM tasks") == 1  # the task exists either way


async def test_handoff_notifications_are_signed(db, ts_env, receiver):
    async with engine(db, ts_env, signing_secret="hook-key") as eng:
        await eng.publish(_handoff(f"{receiver}/notify"))
        steps, results, _ = await _run(eng, "vip", "dee")
    assert steps == ["call", "done"]
    (call,) = Receiver.calls
    assert call["body"]["task_id"] == results["call"]["task_id"]
    verify_signature("hook-key", call["signature"], call["raw"])  # over the raw body
    with pytest.raises(BadSignature):
        verify_signature("other-key", call["signature"], call["raw"])
