"""One handler per step kind. Each returns the next step id, END, or STAY.

STAY means "not done with this step yet": the run loop drains new events (which may exit the
run) or continues-as-new, then calls the handler again; waits keep their deadline in the state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from models.conditions import evaluate
    from models.durations import parse_duration
    from models.journey import END as END_TARGET
    from models.journey import BranchStep, ExitStep, SendStep, Step, WaitForStep, WaitStep
    from models.runtime import ProfileSnapshot, SendRequest, SendResult

if TYPE_CHECKING:
    from workflows.journey import JourneyWorkflow

END = "__end__"
STAY = "__stay__"

ACTIVITY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    non_retryable_error_types=["TemplateError", "InvalidRequest"],
)


async def _wait_until_deadline(run: JourneyWorkflow, wake: Callable[[], bool], label: str) -> bool:
    """Wait for the step deadline or for `wake()`; True when the deadline passed."""
    deadline = run.state.step_deadline
    assert deadline is not None
    remaining = (deadline - workflow.now()).total_seconds()
    if remaining <= 0:
        return True
    try:
        await workflow.wait_condition(
            lambda: wake() or run.continue_as_new_due(),
            timeout=remaining,
            timeout_summary=label,
        )
    except TimeoutError:
        return True
    return False


def _after(run: JourneyWorkflow, step: Step, target: str | None) -> str:
    if target == END_TARGET:
        return END
    if target is not None:
        return target
    nxt = run.journey.following(step.id)
    return nxt if nxt is not None else END


async def wait(run: JourneyWorkflow, step: WaitStep) -> str:
    if await _wait_until_deadline(run, lambda: bool(run.state.pending), f"wait {step.duration}"):
        return _after(run, step, step.next)
    return STAY


async def wait_for(run: JourneyWorkflow, step: WaitForStep) -> str:
    for event in run.state.inbox:
        for i, outcome in enumerate(step.events):
            if outcome.matches(event.as_context(), run.context()):
                run.state.results[step.id] = {
                    "outcome": f"events[{i}]",
                    "event": event.as_context(),
                }
                run.outcome = outcome.event or outcome.type
                return _after(run, step, outcome.next)
    if await _wait_until_deadline(
        run, lambda: bool(run.state.pending), f"wait_for {step.id} (timeout {step.timeout})"
    ):
        run.state.results[step.id] = {"outcome": "timeout"}
        run.outcome = "timeout"
        return _after(run, step, step.on_timeout)
    return STAY


async def branch(run: JourneyWorkflow, step: BranchStep) -> str:
    profile = await workflow.execute_activity(
        "load_profile",
        run.customer_id,
        result_type=ProfileSnapshot,
        start_to_close_timeout=timedelta(seconds=30),
        retry_policy=ACTIVITY_RETRY,
        summary="profile for branch",
    )
    ctx = {**run.context(), "profile": profile.as_context()}
    for i, case in enumerate(step.cases):
        if evaluate(case.when, ctx):
            run.outcome = f"cases[{i}]"
            return _after(run, step, case.next)
    run.outcome = "else"
    return _after(run, step, step.else_)


async def send(run: JourneyWorkflow, step: SendStep) -> str:
    # The counter lives in the state, so the key survives retries, crashes and continue-as-new.
    run.state.send_seq += 1
    info = workflow.info()
    request = SendRequest(
        idempotency_key=f"{run.state.enrollment_id}:{run.state.send_seq}",
        customer_id=run.customer_id,
        journey_id=run.journey.id,
        journey_version=run.journey.version,
        step_id=step.id,
        workflow_id=info.workflow_id,
        channel=step.channel,
        subject=step.template.subject,
        body=step.template.body,
        entry=run.state.entry.as_context() if run.state.entry else None,
    )
    try:
        result = await workflow.execute_activity(
            "send_message",
            request,
            result_type=SendResult,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=ACTIVITY_RETRY,
            summary=f"send {step.channel}",
        )
    except ActivityError as err:
        # A send that cannot succeed (bad template) is recorded; the journey goes on.
        run.state.results[step.id] = {"status": "failed", "error": str(err.cause or err)}
        run.outcome = "failed"
        return _after(run, step, step.next)
    run.state.results[step.id] = {"status": result.status, "message_id": result.message_id}
    run.outcome = result.status
    return _after(run, step, step.next)


async def exit_(run: JourneyWorkflow, step: ExitStep) -> str:
    run.exit(step.reason)
    return END


HANDLERS: dict[str, Callable[[Any, Any], Awaitable[str]]] = {
    "wait": wait,
    "wait_for": wait_for,
    "branch": branch,
    "send": send,
    "exit": exit_,
}


def deadline_for(step: Step) -> timedelta | None:
    if isinstance(step, WaitStep):
        return parse_duration(step.duration)
    if isinstance(step, WaitForStep):
        return parse_duration(step.timeout)
    return None
