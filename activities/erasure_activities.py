"""Activities of a customer erasure: end their runs, delete their rows, delete their Temporal
executions, record the outcome. Each is idempotent (a retry, or a second pass, finds less to do)
and takes only the erasure id: the customer's ids stay in the `erasures` row until it is done,
never in the erasure workflow's history."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import asyncpg
from temporalio import activity
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import (
    Client,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.router import CHUNK_LOCK
from core.logs import get_logger
from models.privacy import (
    DataErased,
    ErasureInput,
    ExecutionsDeleted,
    FinishErasure,
    RunsEnded,
)
from models.runtime import SteerCommand
from store.erasure import (
    current_customer_ids,
    erase_customer,
    erasure_recorded,
    erasure_targets,
    finish_erasure,
    live_runs,
    mark_runs_erased,
    remember_workflows,
)
from workflows.journey import JourneyWorkflow

log = get_logger("erasure")

# A run applies an exit between steps; one busy longer than this (a send retrying against a
# provider that is down) is terminated instead.
STEER_TIMEOUT = timedelta(seconds=10)
# Waiting for the server to delete closed executions: how often to look, and for how long
# in one attempt (workflows.erase gives the activity a heartbeat timeout).
DELETE_POLL = timedelta(milliseconds=500)
DELETE_WAIT = timedelta(seconds=90)
# The API starts the workflow before its erasure row commits: the first step waits this long
# for the row, then ends the workflow doing nothing (the API's commit failed; it answered 503).
ORPHAN_WAIT = timedelta(minutes=5)
# The delete step holds routing off only while it reads and deletes rows: runs an event
# started meanwhile are ended outside the lock, then it looks again, at most this many times
# per attempt (then the attempt fails and is retried, with backoff).
DELETE_PASSES = 5


def _quoted(values: list[str]) -> str:
    return ", ".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)


class ErasureActivities:
    def __init__(self, pool: asyncpg.Pool, client: Client) -> None:
        self.pool = pool
        self.client = client

    # -- Temporal look-ups -------------------------------------------------------------
    async def _executions(
        self, customer_ids: list[str], workflow_ids: list[str], *, running_only: bool = False
    ) -> set[tuple[str, str]]:
        """(workflow id, run id) of every execution of theirs that visibility lists: by the
        CustomerId search attribute, and by the workflow ids of their runs (every run of a
        chain continued as new, and a run that never set its search attributes)."""
        state = ' AND ExecutionStatus = "Running"' if running_only else ""
        queries = [f"CustomerId IN ({_quoted(customer_ids)}){state}"] if customer_ids else []
        queries += [f"WorkflowId = {_quoted([w])}{state}" for w in workflow_ids]
        found: set[tuple[str, str]] = set()
        for query in queries:
            async for wf in self.client.list_workflows(query):
                found.add((wf.id, wf.run_id))
        return found

    async def _delete(self, workflow_id: str, run_id: str = "") -> bool:
        """Delete one execution (no run id: the current one). A running execution is
        terminated and deleted at once; a closed one is deleted by a server task, a little
        later. Returns False when it is already gone."""
        try:
            await self.client.workflow_service.delete_workflow_execution(
                DeleteWorkflowExecutionRequest(
                    namespace=self.client.namespace,
                    workflow_execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
                )
            )
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            return False
        return True

    async def _end_run(self, workflow_id: str, erasure_id: str) -> str:
        """Ask the run to exit (it stops between steps, no send half done), then delete it
        while it is still open (its closing activities would only hand events back to
        routing, and deleting an open execution is immediate)."""
        handle = self.client.get_workflow_handle(workflow_id)
        cmd = SteerCommand(action="exit", reason="customer erased", by=f"erasure:{erasure_id}")
        outcome = "exited"
        try:
            await handle.execute_update(JourneyWorkflow.steer, cmd, rpc_timeout=STEER_TIMEOUT)
        except (
            WorkflowUpdateFailedError,
            WorkflowUpdateRPCTimeoutOrCancelledError,
            RPCError,
        ) as err:
            # Not running, mid-start, busy (no worker, a long step), or already gone: ended
            # by the deletion instead.
            log.info("erasure.steer_refused", erasure_id=erasure_id, error=str(err))
            outcome = "terminated"
        deleted = await self._delete(workflow_id)
        return outcome if deleted or outcome == "exited" else "gone"

    # -- activities --------------------------------------------------------------------
    @activity.defn
    async def end_customer_runs(self, inp: ErasureInput) -> RunsEnded:
        """End every live journey run of the customer (steer exit, then delete).

        The API starts the workflow just before it commits the erasure's row: a row not
        there yet is waited for (the attempt fails and is retried); one still missing after
        ORPHAN_WAIT never will be (the API's commit failed and it answered 503), and the
        workflow ends having found nothing to do."""
        if not await erasure_recorded(self.pool, inp.erasure_id):
            waited = datetime.now(UTC) - activity.info().scheduled_time
            if waited > ORPHAN_WAIT:
                log.warning("erasure.never_recorded", erasure_id=inp.erasure_id)
                return RunsEnded()
            raise ApplicationError(
                "erasure_id: no erasure record yet; waiting for its commit",
                type="ErasureNotRecorded",
            )
        _, _, mode = await erasure_targets(self.pool, inp.erasure_id)
        ids = await current_customer_ids(self.pool, inp.erasure_id)
        if not ids or mode == "suppress":
            return RunsEnded()
        rows = await live_runs(self.pool, ids)
        live = set(rows.values())
        live |= {w for w, _ in await self._executions(ids, [], running_only=True)}
        await remember_workflows(self.pool, inp.erasure_id, sorted(live))
        outcomes = await asyncio.gather(*(self._end_run(w, inp.erasure_id) for w in sorted(live)))
        await mark_runs_erased(self.pool, list(rows))
        return RunsEnded(
            found=len(live),
            exited=outcomes.count("exited"),
            terminated=outcomes.count("terminated"),
        )

    @activity.defn
    async def erase_customer_data(self, inp: ErasureInput) -> DataErased:
        """Delete their rows in one transaction with routing held off (the router's chunk
        lock). Under the lock it only reads and deletes rows: if an event started a run for
        them since `end_customer_runs`, it commits, deletes those executions with the lock
        released (a slow Temporal must not stall everyone's routing), and looks again."""
        for _ in range(DELETE_PASSES):
            async with self.pool.acquire() as conn, conn.transaction():
                # Held to the commit: no chunk is routed (no merge, no run started) between
                # the look-ups below and the deletion. erase_customer takes it again.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", CHUNK_LOCK)
                _, _, mode = await erasure_targets(conn, inp.erasure_id)
                ids = await current_customer_ids(conn, inp.erasure_id)
                if not ids:
                    return DataErased()
                late = {} if mode == "suppress" else await live_runs(conn, ids)
                if not late:
                    return await erase_customer(
                        conn, inp.erasure_id, ids, mode, router_lock=CHUNK_LOCK
                    )
                await remember_workflows(conn, inp.erasure_id, sorted(set(late.values())))
            # Lock released: Temporal calls may take their time.
            for workflow_id in sorted(set(late.values())):
                await self._delete(workflow_id)
            await mark_runs_erased(self.pool, list(late))
            running = await self._executions(ids, [], running_only=True)
            for workflow_id, run_id in sorted(running):
                await self._delete(workflow_id, run_id)
        raise ApplicationError(
            f"runs kept starting for the customer ({DELETE_PASSES} passes); trying again",
            type="ErasureRunsStarting",
        )

    @activity.defn
    async def delete_customer_executions(self, inp: ErasureInput) -> ExecutionsDeleted:
        """Delete their executions from Temporal (history and visibility). The server deletes
        closed executions asynchronously (about 30 s on the dev server): this waits, with
        heartbeats, until visibility lists none of them and every workflow id describes as not
        found; past DELETE_WAIT it fails and is retried."""
        ids, workflow_ids, mode = await erasure_targets(self.pool, inp.erasure_id)
        if not ids or mode == "suppress":
            return ExecutionsDeleted()
        requested: set[tuple[str, str]] = set()
        started = time.monotonic()
        while True:
            listed = await self._executions(ids, workflow_ids)
            for workflow_id, run_id in sorted(listed - requested):
                await self._delete(workflow_id, run_id)
            requested |= listed
            left = len(listed) + len([w for w in workflow_ids if not await self._described_gone(w)])
            if not left:
                return ExecutionsDeleted(deleted=len(requested))
            if time.monotonic() - started > DELETE_WAIT.total_seconds():
                raise ApplicationError(
                    f"{left} executions still listed or described; deletion in progress",
                    type="ErasurePending",
                )
            activity.heartbeat(left)
            await asyncio.sleep(DELETE_POLL.total_seconds())

    async def _described_gone(self, workflow_id: str) -> bool:
        try:
            await self.client.get_workflow_handle(workflow_id).describe()
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            return True
        return False

    @activity.defn
    async def finish_customer_erasure(self, done: FinishErasure) -> None:
        """Record the outcome; the customer's ids leave the erasure record."""
        await finish_erasure(self.pool, done.erasure_id, done.outcome.model_dump())
        log.info(
            "erasure.completed",
            erasure_id=done.erasure_id,
            runs=done.outcome.runs.found,
            executions=done.outcome.executions.deleted,
            rows=sum(done.outcome.data.counts.values()),
            suppressed=done.outcome.data.suppressed,
        )

    def all(self) -> list[object]:
        return [
            self.end_customer_runs,
            self.erase_customer_data,
            self.delete_customer_executions,
            self.finish_customer_erasure,
        ]
