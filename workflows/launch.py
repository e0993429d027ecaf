"""LaunchWorkflow: enrol an audience into a journey, page by page, at a configured rate.

The cursor and counters live in the workflow, so a restart (worker, server) continues where
it stopped; each page's enrolment is idempotent per (customer, launch), so a retried page never
enrols anyone twice. Cancel with the `cancel` signal; progress via the `progress` query.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from models.runtime import AudiencePage, LaunchInput, LaunchProgress, PageResult
    from workflows.steps import ACTIVITY_RETRY

PAGES_PER_RUN = 200  # continue-as-new after this many pages
# Launches recorded before this patch slept through a cancel; their histories keep that path.
CANCEL_WAKES_RATE_WAIT = "launch-cancel-wakes-rate-wait"
# A page that fails for good (journey no longer active, audience no longer valid) ends the
# launch as `failed` with its error, recorded, instead of failing the workflow while the
# launches row still says `running`. Launches recorded before this patch failed as they did.
FAILURE_RECORDED = "launch-failure-recorded"


@workflow.defn(name="LaunchWorkflow")
class LaunchWorkflow:
    @workflow.init
    def __init__(self, inp: LaunchInput) -> None:
        self.inp = inp.model_copy()
        if not self.inp.launch_id:
            # A scheduled launch: one id per firing, stable across retries of this run.
            self.inp.launch_id = f"{workflow.info().workflow_id}"[-64:]
        self.status = "running"
        self.cancelled = False
        self.error: str | None = None

    @workflow.signal
    def cancel(self) -> None:
        self.cancelled = True

    @workflow.query
    def progress(self) -> LaunchProgress:
        return LaunchProgress(
            launch_id=self.inp.launch_id,
            journey_id=self.inp.journey_id,
            status=self.status,
            enrolled=self.inp.enrolled,
            skipped=self.inp.skipped,
            cursor=self.inp.cursor,
            pages=self.inp.pages,
            error=self.error,
        )

    @workflow.run
    async def run(self, inp: LaunchInput) -> LaunchProgress:
        s = self.inp
        if s.pages == 0:
            await self._record()
        pages_this_run = 0
        while not self.cancelled:
            try:
                page = await self._page()
            except ActivityError as err:
                if not workflow.patched(FAILURE_RECORDED):
                    raise
                self.status = "failed"
                self.error = f"page after {s.cursor or 'start'}: {err.cause or err}"[:1000]
                await self._record()
                return self.progress()
            if page.count == 0:
                break
            s.enrolled += page.enrolled
            s.skipped += page.skipped
            s.cursor = page.last
            s.pages += 1
            pages_this_run += 1
            await self._record()
            # Rate: this page's customers spread over count / rate seconds.
            pause = timedelta(seconds=page.count / s.rate_per_second)
            if workflow.patched(CANCEL_WAKES_RATE_WAIT):
                # A cancel ends the wait at once (cancelling its timer).
                with contextlib.suppress(asyncio.TimeoutError):
                    await workflow.wait_condition(
                        lambda: self.cancelled, timeout=pause, timeout_summary="rate limit"
                    )
            else:
                # Runs that slept this way before the patch replay the same commands.
                await workflow.sleep(pause, summary="rate limit")
            if pages_this_run >= PAGES_PER_RUN or workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(s)
        self.status = "cancelled" if self.cancelled else "completed"
        await self._record()
        return self.progress()

    async def _page(self) -> PageResult:
        s = self.inp
        return await workflow.execute_activity(
            "enroll_audience_page",
            AudiencePage(
                launch_id=s.launch_id,
                journey_id=s.journey_id,
                audience=s.audience,
                after=s.cursor,
                limit=s.page_size,
            ),
            result_type=PageResult,
            start_to_close_timeout=timedelta(minutes=5),
            # A page held by a worker that died is retried within seconds.
            heartbeat_timeout=timedelta(seconds=5),
            retry_policy=ACTIVITY_RETRY,
            summary=f"page after {s.cursor or 'start'}",
        )

    async def _record(self) -> None:
        await workflow.execute_activity(
            "record_launch",
            self.progress(),
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=ACTIVITY_RETRY,
            summary="record progress",
        )
