"""Exactly-once sends with the worker process SIGKILLed at each point of a send, then
restarted; counted at the real local SMTP server and HTTP provider.

After the kill, the server would notice the dead attempt when its start-to-close timeout (30 s)
expires and retry it. To keep the suite fast the test declares the attempt failed at once
through Temporal's activity-by-id API, which takes the same retry path without the wait.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from activities.channels.email import message_id_for
from core.settings import ROOT
from store.events import store_events
from store.journeys import parse_definition, publish
from tests.conftest import eventually
from tests.e2e.conftest import Stack
from tests.harness import identify, track
from tests.providers import Provider, provider_settings
from tests.smtp import Recorder
from workflows.journey import workflow_id_for

POINTS = ("before_provider", "after_provider", "after_record")


def _journey(channel: str) -> dict:
    return {
        "id": f"crash-{channel}",
        "name": channel,
        "entry": {"event": f"Go {channel}"},
        "steps": [{"id": "hello", "kind": "send", "channel": channel, "category": "transactional",
                   "template": {"subject": "Order", "body": "Your order shipped"}}],
    }  # fmt: skip


def _cases() -> list[tuple[str, str, str]]:
    """(channel, point, address): one customer per case."""
    out = []
    for i, point in enumerate(POINTS):
        out.append(("sms", point, f"+1555000900{i}"))
        out.append(("email", point, f"crash{i}@example.com"))
    return out


async def _fail_running_send(client: Client, workflow_id: str) -> None:
    """What the server does when the dead attempt times out, without waiting for it."""

    async def pending() -> list:
        desc = await client.get_workflow_handle(workflow_id).describe()
        return list(desc.raw_description.pending_activities)

    (act,) = await eventually(pending, within=20, what=f"the running send of {workflow_id}")
    handle = client.get_async_activity_handle(
        workflow_id=workflow_id, run_id=None, activity_id=act.activity_id
    )
    await handle.fail(ApplicationError("worker process killed"))


async def test_sigkill_at_each_point_of_a_send(stack: Stack, db, dev_env, smtp, provider):
    recorder, smtp_port = smtp
    provider: Provider
    markers = Path(tempfile.mkdtemp(prefix="crash-"))
    env = {
        **stack.env(),
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "EMAIL_SENDER_DOMAIN": "shop.example",
        **{k.upper(): str(v) for k, v in provider_settings(provider).items()},
        "CRASH_PLAN": ",".join(f"{addr}={point}" for _, point, addr in _cases()),
        "CRASH_DIR": str(markers),
    }
    for channel in ("sms", "email"):
        await publish(db, parse_definition(_journey(channel)))

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "tests.crash_worker"], env=env, cwd=ROOT)

    proc = start()
    try:
        for channel, point, address in _cases():
            user = f"u-{address}"
            trait = {"phone": address} if channel == "sms" else {"email": address}
            events = [identify(user, **trait), track(user, f"Go {channel}")]
            await store_events(db, [_stored(e) for e in events])
            await eventually(
                lambda p=proc: _exited(p), within=60, what=f"the kill at {point} ({channel})"
            )
            assert (markers / address).read_text() == point
            cid = await db.fetchval("SELECT customer_id FROM identities WHERE value = $1", user)
            wid = workflow_id_for(f"crash-{channel}", cid)
            await _fail_running_send(dev_env.client, wid)
            proc = start()
            # The run completes: the retried send went through or reconciled.
            await asyncio.wait_for(dev_env.client.get_workflow_handle(wid).result(), 60)
            row = await db.fetchrow("SELECT * FROM messages WHERE customer_id = $1", cid)
            got = _received(channel, address, recorder, provider)
            if channel == "email":
                assert {m["Message-ID"] for m in got} == {
                    message_id_for(row["idempotency_key"], "shop.example")
                }
            # HTTP providers deduplicate on the key: one, wherever the kill. SMTP has no such
            # key: after the server accepted and before we recorded it, the retry sends again
            # (same Message-ID); everywhere else exactly one.
            expected = 2 if (channel, point) == ("email", "after_provider") else 1
            assert len(got) == expected, (channel, point, len(got))
            assert row["status"] == "sent"
            # A retry claims the row again unless the outcome was already recorded.
            assert row["attempts"] == (1 if point == "after_record" else 2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _stored(event: dict) -> dict:
    from models.segment import parse_event

    return parse_event(event).model_dump()


async def _exited(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def _received(channel: str, address: str, recorder: Recorder, provider: Provider) -> list:
    if channel == "sms":
        return [d for d in provider.by_kind("sms") if d["To"] == address]
    return [m for m in recorder.messages() if m["To"] == address]
