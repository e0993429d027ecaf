"""Reconciliation: runs ended outside our code (terminated with the CLI) and their unsent
messages are brought in line with Temporal (dev server, in-process engine)."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Coroutine
from typing import Any

from activities.channels import StoredChannel
from activities.channels.email import EmailChannel
from core.embedded import find_binary
from models.runtime import JourneyRunInput
from store.journeys import parse_definition
from tests.conftest import eventually
from tests.harness import Engine, engine, identify, track
from tests.smtp import free_port
from workflows.journey import JourneyWorkflow

JOURNEY = {
    "id": "reconciled",
    "name": "Reconciled",
    "entry": {"event": "Started"},
    "steps": [
        {"id": "hello", "kind": "send", "channel": "email",
         "template": {"subject": "Hello", "body": "hello"}},
        {"id": "long_wait", "kind": "wait", "duration": "30d"},
    ],
}  # fmt: skip
WAITER = {
    "id": "waiter",
    "name": "Waiter",
    "entry": {"event": "Started"},
    "steps": [{"id": "long_wait", "kind": "wait", "duration": "30d"}],
}


def terminate(eng: Engine, workflow_id: str) -> None:
    """As an operator would, outside our code."""
    subprocess.run(
        [find_binary("temporal"), "workflow", "terminate",
         "--address", eng.client.service_client.config.target_host, "--namespace", "default",
         "--workflow-id", workflow_id, "--reason", "cleanup by hand"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


async def test_a_terminated_run_and_its_unsent_message_are_reconciled(db, dev_env):
    mail = EmailChannel(host="127.0.0.1", port=free_port(), sender="Shop <news@shop.example>",
                        sender_domain="shop.example", timeout=5)  # fmt: skip
    channels = {"outbox": StoredChannel("outbox"), "email": mail}
    async with engine(db, dev_env, channels=channels) as eng:
        await eng.publish(JOURNEY)
        await eng.publish(WAITER)
        await eng.send(identify("rc1", email="rc1@example.com"), track("rc1", "Started"))
        cid = await eng.customer("rc1")

        async def stuck() -> bool:  # the provider is down: the send keeps retrying
            return bool(
                await eng.pool.fetchval(
                    "SELECT count(*) FROM messages WHERE customer_id = $1 "
                    "AND status IN ('pending', 'sending') AND error IS NOT NULL",
                    cid,
                )
            )

        await eventually(stuck, what="a send retrying")
        handle = await eng.run("reconciled", "rc1")
        await asyncio.to_thread(terminate, eng, handle.id)
        assert await eng.router.reconcile() == 1
        run = await eng.pool.fetchrow(
            "SELECT status, exit_reason, ended_at FROM journey_runs WHERE workflow_id = $1",
            handle.id,
        )
        assert run["status"] == "exited"
        assert run["exit_reason"] == "workflow terminated: cleanup by hand"
        assert run["ended_at"] is not None
        (msg,) = await eng.pool.fetch("SELECT * FROM messages WHERE customer_id = $1", cid)
        assert (msg["status"], msg["skip_reason"]) == ("failed", "abandoned")
        assert "terminated" in msg["error"]
        # The other journey's run is alive and untouched; a second pass finds nothing.
        live = await eng.pool.fetchval(
            "SELECT status FROM journey_runs WHERE journey_id = 'waiter' AND customer_id = $1", cid
        )
        assert live == "running"
        assert await eng.router.reconcile() == 0


async def test_a_merged_duplicate_the_router_could_not_tell_is_ended_by_reconcile(
    db, dev_env, monkeypatch
):
    async with engine(db, dev_env) as eng:
        await eng.publish(WAITER)
        await eng.send(identify("rd1"), track("rd1", "Started"))
        anon = {"type": "track", "anonymousId": "anon-rd1", "event": "Started"}
        await eng.send({**anon, "messageId": "m-rd1-anon"})
        survivor, loser = await eng.customer("rd1"), await eng.customer("anon-rd1")
        duplicate = eng.client.get_workflow_handle(f"journey-waiter-{loser}")
        # The worker dies before it tells the duplicate run: the background call is lost.
        lost: list[Coroutine[Any, Any, None]] = []

        def crash(call: Coroutine[Any, Any, None]) -> None:
            call.close()
            lost.append(call)

        monkeypatch.setattr(eng.router, "_in_background", crash)
        merge = {"type": "alias", "userId": "rd1", "previousId": "anon-rd1", "messageId": "m-al"}
        await eng.send(merge)
        assert len(lost) == 1
        assert (await duplicate.describe()).status.name == "RUNNING"
        monkeypatch.undo()
        assert await eng.router.reconcile() == 0  # nothing abandoned; the exit is re-sent
        result = await duplicate.result()
        assert (result["status"], result["exit_reason"]) == (
            "exited",
            f"operator: merged into {survivor}",
        )
        row = await eng.pool.fetchrow(
            "SELECT status, exit_reason FROM journey_runs WHERE workflow_id = $1", duplicate.id
        )
        assert (row["status"], row["exit_reason"]) == (
            "exited",
            f"operator: merged into {survivor}",
        )


def _exits_in_flight() -> int:
    """Background tasks telling a merged duplicate to exit."""
    return sum(
        1
        for t in asyncio.all_tasks()
        if not t.done()
        and getattr(t.get_coro(), "__qualname__", "") == "EventRouter._end_duplicate"
    )


async def _no_exits_in_flight() -> bool:
    return _exits_in_flight() == 0


async def test_duplicates_that_never_accept_the_exit_do_not_stall_routing(db, dev_env):
    # Two routing slots, three merged duplicates whose workflow tasks never complete (here:
    # nobody polls their queue; in production a non-determinism error after a deploy).
    async with engine(db, dev_env, concurrency=2) as eng:
        eng.router.exit_wait = 1.0
        await eng.publish(WAITER)
        defn = parse_definition(WAITER)
        stuck = [f"journey-waiter-stuck{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
        try:
            for wid in stuck:
                await eng.client.start_workflow(
                    JourneyWorkflow.run,
                    JourneyRunInput(journey=defn, customer_id=wid, enrollment_id=f"{wid}:m",
                                    history_limit=100, events=[]),
                    id=wid, task_queue=f"nobody-polls-{uuid.uuid4().hex[:6]}",
                )  # fmt: skip
                await eng.pool.execute(
                    "INSERT INTO journey_runs (enrollment_id, workflow_id, journey_id, "
                    "journey_version, customer_id, status, exit_reason, ended_at) "
                    "VALUES ($1, $2, 'waiter', 1, $3, 'exited', 'merged', now())",
                    f"{wid}:m", wid, wid,
                )  # fmt: skip
            for _ in range(3):  # passes while the first exits are still waiting
                assert await asyncio.wait_for(eng.router.reconcile(), timeout=20) == 0
            assert _exits_in_flight() == 3  # one per duplicate, not one per pass
            await asyncio.wait_for(eng.send(identify("rs1"), track("rs1", "Started")), 20)
            run = await eng.run("waiter", "rs1")
            assert (await run.describe()).status.name == "RUNNING"
            # Each wait is bounded; the next pass tries again.
            await eventually(_no_exits_in_flight, what="the exits to give up")
            assert await eng.router.reconcile() == 0
            assert _exits_in_flight() == 3
        finally:
            for wid in stuck:
                await eng.client.get_workflow_handle(wid).terminate("test ended")
        await eventually(_no_exits_in_flight, what="the exits to end")
        # Closed now: recorded once, never described again.
        assert await eng.router.reconcile() == 0
        reasons = await eng.pool.fetch(
            "SELECT exit_reason FROM journey_runs WHERE workflow_id = ANY($1::text[])", stuck
        )
        assert [r["exit_reason"] for r in reasons] == ["merged (workflow terminated)"] * 3
