"""ErasureWorkflow: erase one customer durably (right to be forgotten).

A worker crash, a database outage or a Temporal restart only delays it: every step is an
idempotent activity retried until it succeeds. The order matters:

1. end the customer's journey runs (steer exit between steps, then delete the execution, which
   terminates it if it is still open), so no send is half done when their data goes;
2. delete their rows in one transaction with event routing held off, keeping only hashed
   suppressions; the customer ids are computed again there (merges), and runs an event started
   meanwhile are deleted first, with routing let through while Temporal is called;
3. delete their Temporal executions, until visibility lists none;
4. delete again: rows written by an activity that was still in flight when its run ended;
5. record the outcome; the erasure record keeps hashes only.

The input and every result carry the erasure id and counts, never a customer id or address.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.erasure_activities import ErasureActivities
    from models.privacy import ErasureInput, ErasureOutcome, FinishErasure

# Never gives up: an erasure must finish. Backoff keeps a long outage cheap.
ERASURE_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
)
ERASURE_ACTIVITY = {
    "start_to_close_timeout": timedelta(minutes=2),
    "retry_policy": ERASURE_RETRY,
}


def erasure_workflow_id(erasure_id: str) -> str:
    return f"erasure-{erasure_id}"


@workflow.defn(name="ErasureWorkflow")
class ErasureWorkflow:
    @workflow.init
    def __init__(self, inp: ErasureInput) -> None:
        self.stage = "starting"

    @workflow.query
    def progress(self) -> str:
        """The step in progress: ending_runs, erasing_data, deleting_executions, ..."""
        return self.stage

    @workflow.run
    async def run(self, inp: ErasureInput) -> ErasureOutcome:
        out = ErasureOutcome()
        self.stage = "ending_runs"
        out.runs = await workflow.execute_activity_method(
            ErasureActivities.end_customer_runs, inp, summary="end runs", **ERASURE_ACTIVITY
        )
        self.stage = "erasing_data"
        out.data = await workflow.execute_activity_method(
            ErasureActivities.erase_customer_data, inp, summary="erase data", **ERASURE_ACTIVITY
        )
        self.stage = "deleting_executions"
        out.executions = await workflow.execute_activity_method(
            ErasureActivities.delete_customer_executions,
            inp,
            summary="delete executions",
            start_to_close_timeout=timedelta(minutes=3),
            heartbeat_timeout=timedelta(seconds=20),
            retry_policy=ERASURE_RETRY,
        )
        self.stage = "sweeping"
        late = await workflow.execute_activity_method(
            ErasureActivities.erase_customer_data, inp, summary="sweep", **ERASURE_ACTIVITY
        )
        for table, n in late.counts.items():
            out.data.counts[table] = out.data.counts.get(table, 0) + n
        out.data.suppressed += late.suppressed
        self.stage = "recording"
        await workflow.execute_activity_method(
            ErasureActivities.finish_customer_erasure,
            FinishErasure(erasure_id=inp.erasure_id, outcome=out),
            summary="record outcome",
            **ERASURE_ACTIVITY,
        )
        self.stage = "completed"
        return out
