"""One handler per step kind. Each returns the next step id, END, or STAY.

STAY means "not done with this step yet": the run loop drains new events (which may exit the
run) or continues-as-new, then calls the handler again; waits keep their deadline in the state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from models.conditions import evaluate, resolve
    from models.durations import parse_duration
    from models.journey import END as END_TARGET
    from models.journey import (
        BranchStep,
        ExitStep,
        GotoStep,
        HandoffStep,
        HoldoutStep,
        ScoreStep,
        SendStep,
        SplitStep,
        Step,
        UpdateProfileStep,
        WaitForStep,
        WaitStep,
        WebhookStep,
    )
    from models.runtime import (
        ProfileSnapshot,
        ProfileUpdate,
        QuietRequest,
        ScoreRequest,
        ScoreResult,
        SendRequest,
        SendResult,
        TaskCreated,
        TaskRequest,
        WaitRequest,
        WaitResolution,
        WebhookRequest,
        WebhookResult,
    )

if TYPE_CHECKING:
    from workflows.journey import JourneyWorkflow

END = "__end__"
STAY = "__stay__"

# Database-only activities take milliseconds; a short limit means a task held by a crashed
# worker is retried within seconds.
DB_ACTIVITY_TIMEOUT = timedelta(seconds=10)
# A provider call has its own timeout (PROVIDER_TIMEOUT, SMTP_TIMEOUT, 10 s by default).
SEND_TIMEOUT = timedelta(seconds=30)

# Send outcomes that are failures (not skips): the provider refused, the address bounced.
FAILED_SENDS = ("failed", "bounced")
# Activity error types of a send, as a failure reason (the channel report uses the same words).
_FAILURE_REASONS = {"TemplateError": "template_error", "InvalidRequest": "invalid_request"}

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
    if wake():
        return False  # events to apply first: no timer needed for this round
    try:
        await workflow.wait_condition(
            lambda: wake() or run.continue_as_new_due() or run.state.steer is not None,
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
    if run.state.step_deadline is None:
        # `at` / `until`: the moment depends on the customer's timezone or a date value.
        resolved = await workflow.execute_activity(
            "resolve_wait",
            WaitRequest(
                customer_id=run.customer_id,
                now=workflow.now(),
                at=step.at,
                weekdays=list(step.weekdays) if step.weekdays else None,
                until=step.until,
                offset=step.offset,
                entry=run.state.entry.as_context() if run.state.entry else None,
            ),
            result_type=WaitResolution,
            start_to_close_timeout=DB_ACTIVITY_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
            summary=run.label(step.id, "resolve wait"),
        )
        run.state.results[step.id] = {
            "until": resolved.deadline.isoformat() if resolved.deadline else None,
            "note": resolved.note,
        }
        if resolved.deadline is None or resolved.deadline <= workflow.now():
            run.outcome = "past" if resolved.deadline else (resolved.note or "no date")
            return _after(run, step, step.next)
        run.state.step_deadline = resolved.deadline
        run.publish_position()
    label = run.label(step.id, f"wait {step.duration or step.at or step.until}")
    if await _wait_until_deadline(run, lambda: bool(run.state.pending), label):
        return _after(run, step, step.next)
    return STAY


def _template_data(run: JourneyWorkflow, step: Step) -> dict[str, Any]:
    """`trigger` and `results` for an activity that renders the step's templates. Only the
    results of steps the step's definition mentions travel (every send would otherwise carry
    all of them into history); None for `trigger` means the entry event."""
    st = run.state
    text = step.model_dump_json()
    results = {k: v for k, v in st.results.items() if k in text} if "results" in text else {}
    return {"trigger": st.trigger.as_context() if st.trigger else None, "results": results}


def _correlated(run: JourneyWorkflow, paths: list[str], event: dict[str, Any]) -> bool:
    entry = run.state.entry.as_context() if run.state.entry else {}
    for path in paths:
        value = resolve(path, event)
        if value is None or value != resolve(path, entry):
            return False
    return True


async def wait_for(run: JourneyWorkflow, step: WaitForStep) -> str:
    candidates = run.state.received if step.since == "entry" else run.state.inbox
    for event in list(candidates):
        for i, outcome in enumerate(step.events):
            ctx = event.as_context()
            if outcome.matches(ctx, run.context()) and _correlated(run, outcome.correlate, ctx):
                if event in run.state.received:
                    run.state.received.remove(event)  # consumed: a later step won't count it
                run.state.results[step.id] = {
                    "outcome": f"events[{i}]",
                    "event": event.as_context(),
                }
                run.state.trigger = event
                run.outcome = outcome.event or outcome.type
                return _after(run, step, outcome.next)
    if await _wait_until_deadline(
        run,
        lambda: bool(run.state.pending),
        run.label(step.id, f"wait_for (timeout {step.timeout})")
        if run.visible
        else f"wait_for {step.id} (timeout {step.timeout})",
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
        start_to_close_timeout=DB_ACTIVITY_TIMEOUT,
        retry_policy=ACTIVITY_RETRY,
        summary=run.label(step.id, "profile for branch"),
    )
    ctx = {**run.context(), "profile": profile.as_context()}
    for i, case in enumerate(step.cases):
        if evaluate(case.when, ctx):
            run.outcome = f"cases[{i}]"
            return _after(run, step, case.next)
    run.outcome = "else"
    return _after(run, step, step.else_)


async def _quiet_until(run: JourneyWorkflow, step: SendStep) -> str | None:
    """STAY while waiting out quiet hours; otherwise None (go on with the send)."""
    st = run.state
    assert step.quiet_hours is not None
    mark = st.results.setdefault(step.id, {})
    if "quiet_until" not in mark:
        resolved = await workflow.execute_activity(
            "quiet_hours",
            QuietRequest(
                customer_id=run.customer_id,
                now=workflow.now(),
                start=step.quiet_hours.start,
                end=step.quiet_hours.end,
            ),
            result_type=WaitResolution,
            start_to_close_timeout=DB_ACTIVITY_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
            summary=run.label(step.id, "quiet hours"),
        )
        mark["quiet_until"] = resolved.deadline.isoformat() if resolved.deadline else None
        if resolved.deadline is not None and step.quiet_hours.mode == "wait":
            st.step_deadline = resolved.deadline
            run.publish_position()
    if mark["quiet_until"] is None or step.quiet_hours.mode == "skip":
        return None
    if await _wait_until_deadline(run, lambda: bool(st.pending), run.label(step.id, "quiet hours")):
        return None
    return STAY


async def send(run: JourneyWorkflow, step: SendStep) -> str:
    if run.state.holdout:
        run.state.results[step.id] = {"status": "holdout"}
        run.outcome = "holdout"
        return _after(run, step, step.next)
    quiet = False
    if step.quiet_hours is not None:
        if await _quiet_until(run, step) == STAY:
            return STAY
        quiet = step.quiet_hours.mode == "skip" and bool(
            run.state.results[step.id].get("quiet_until")
        )
    # The counter lives in the state, so the key survives retries, crashes and continue-as-new.
    run.state.send_seq += 1
    info = workflow.info()
    request = SendRequest(
        idempotency_key=f"{run.state.enrollment_id}:{run.state.send_seq}",
        skip_reason="quiet_hours" if quiet else None,
        category=step.category,
        topic=step.topic,
        journey_cap=run.journey.frequency_cap,
        customer_id=run.customer_id,
        journey_id=run.journey.id,
        journey_version=run.journey.version,
        step_id=step.id,
        workflow_id=info.workflow_id,
        channel=step.channel if isinstance(step.channel, str) else step.channel[0],
        channels=step.channel if isinstance(step.channel, list) else [],
        subject=step.template.subject,
        body=step.template.body,
        html=step.template.html,
        template_id=step.template.ref,
        template_version=step.template.version,
        variants=dict(step.variants),
        entry=run.state.entry.as_context() if run.state.entry else None,
        **_template_data(run, step),
    )
    try:
        result = await workflow.execute_activity(
            "send_message",
            request,
            result_type=SendResult,
            start_to_close_timeout=SEND_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
            summary=run.label(step.id, f"send {'/'.join(step.channels)}"),
        )
    except ActivityError as err:
        # A send that cannot succeed (bad template) is recorded and counted; the journey goes on.
        cause = err.cause or err
        run.state.results[step.id] = {"status": "failed", "error": str(cause)}
        run.outcome = "failed"
        reason = getattr(cause, "type", None) or type(cause).__name__
        run.record_failure(step.id, _FAILURE_REASONS.get(reason, reason), error=str(cause))
        return _after(run, step, step.next)
    run.state.results[step.id] = {
        **run.state.results.get(step.id, {}),
        "status": result.status,
        "message_id": result.message_id,
        **({"channel": result.channel} if result.channel else {}),
        **({"reason": result.reason} if result.reason else {}),
    }
    run.outcome = f"skipped: {result.reason}" if result.status == "skipped" else result.status
    if result.status in FAILED_SENDS:
        run.record_failure(
            step.id, result.reason or result.status, channel=result.channel, error=result.error
        )
    return _after(run, step, step.next)


async def exit_(run: JourneyWorkflow, step: ExitStep) -> str:
    run.exit(step.reason)
    return END


def _bucket(run: JourneyWorkflow, step: Step, salt: str, size: int) -> int:
    """A stable number in [0, size) per (journey, customer, step): same customer, same arm."""
    key = f"{run.journey.id}:{run.customer_id}:{step.id}:{salt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % size


async def split(run: JourneyWorkflow, step: SplitStep) -> str:
    point = _bucket(run, step, "split", sum(a.weight for a in step.arms))
    for arm in step.arms:
        if point < arm.weight:
            break
        point -= arm.weight
    run.state.results[step.id] = {"arm": arm.name}
    run.state.arm = arm.name
    run.outcome = arm.name
    return _after(run, step, arm.next)


async def holdout(run: JourneyWorkflow, step: HoldoutStep) -> str:
    held = _bucket(run, step, "holdout", 10_000) < round(step.percent * 100)
    run.state.holdout = run.state.holdout or held
    run.state.results[step.id] = {"holdout": held}
    run.outcome = "holdout" if held else "treatment"
    return _after(run, step, step.next)


async def goto(run: JourneyWorkflow, step: GotoStep) -> str:
    done = run.state.loops.get(step.id, 0)
    if done < step.max_iterations:
        run.state.loops[step.id] = done + 1
        run.outcome = f"iteration {done + 1}"
        return _after(run, step, step.target)
    run.outcome = "bound reached"
    return _after(run, step, step.next)


def _effect_key(run: JourneyWorkflow, kind: str) -> str:
    run.state.effect_seq += 1
    return f"{run.state.enrollment_id}:{kind}:{run.state.effect_seq}"


async def update_profile(run: JourneyWorkflow, step: UpdateProfileStep) -> str:
    await workflow.execute_activity(
        "update_profile",
        ProfileUpdate(
            idempotency_key=_effect_key(run, "profile"),
            customer_id=run.customer_id,
            set=step.set,
            increment=step.increment,
            unset=step.unset,
            add_tags=step.add_tags,
            remove_tags=step.remove_tags,
        ),
        start_to_close_timeout=DB_ACTIVITY_TIMEOUT,
        retry_policy=ACTIVITY_RETRY,
        summary=run.label(step.id, "update profile"),
    )
    return _after(run, step, step.next)


async def score(run: JourneyWorkflow, step: ScoreStep) -> str:
    result = await workflow.execute_activity(
        "score",
        ScoreRequest(model=step.model, customer_id=run.customer_id),
        result_type=ScoreResult,
        start_to_close_timeout=timedelta(seconds=60),
        retry_policy=ACTIVITY_RETRY,
        summary=run.label(step.id, f"score {step.model}"),
    )
    run.state.results[step.id] = {"model": result.model, "score": result.score, **result.details}
    run.outcome = f"{result.score:g}"
    return _after(run, step, step.next)


WEBHOOK_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=8,
    non_retryable_error_types=["TemplateError", "InvalidRequest"],
)


async def webhook(run: JourneyWorkflow, step: WebhookStep) -> str:
    request = WebhookRequest(
        idempotency_key=_effect_key(run, "webhook"),
        customer_id=run.customer_id,
        journey_id=run.journey.id,
        step_id=step.id,
        url=step.url,
        method=step.method,
        headers=step.headers,
        payload=step.payload,
        timeout_seconds=step.timeout_seconds,
        entry=run.state.entry.as_context() if run.state.entry else None,
        journey_version=run.journey.version,
        **_template_data(run, step),
    )
    try:
        result = await workflow.execute_activity(
            "call_webhook",
            request,
            result_type=WebhookResult,
            start_to_close_timeout=timedelta(seconds=step.timeout_seconds + 5),
            retry_policy=WEBHOOK_RETRY,
            summary=run.label(step.id, f"{step.method} {step.url}"),
        )
    except ActivityError as err:
        # Retries exhausted (provider down) or a template error: take the error branch.
        run.state.results[step.id] = {"ok": False, "status": None, "error": str(err.cause or err)}
        run.outcome = "failed"
        return _after(run, step, step.on_error or step.next)
    run.state.results[step.id] = result.model_dump()
    run.outcome = str(result.status)
    if not result.ok:
        return _after(run, step, step.on_error or step.next)
    return _after(run, step, step.next)


async def handoff(run: JourneyWorkflow, step: HandoffStep) -> str:
    st = run.state
    task = st.results.get(step.id, {}).get("task_id")
    if task is None:
        created = await workflow.execute_activity(
            "create_task",
            TaskRequest(
                idempotency_key=_effect_key(run, "task"),
                customer_id=run.customer_id,
                journey_id=run.journey.id,
                step_id=step.id,
                workflow_id=workflow.info().workflow_id,
                enrollment_id=st.enrollment_id,
                queue=step.queue,
                title=step.title,
                details=step.details,
                notify_url=step.notify_url,
                entry=st.entry.as_context() if st.entry else None,
                journey_version=run.journey.version,
                **_template_data(run, step),
            ),
            result_type=TaskCreated,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=ACTIVITY_RETRY,
            summary=run.label(step.id, f"hand-off to {step.queue}"),
        )
        task = created.task_id
        st.results[step.id] = {"task_id": task, "queue": step.queue}
        if step.notify_url is not None:
            notify: dict[str, Any] = {"ok": created.notify_error is None}
            notify["status"] = created.notify_status
            if created.notify_error is not None:
                notify["error"] = created.notify_error
            st.results[step.id]["notify"] = notify
            if created.notify_error is not None and step.on_error is not None:
                run.outcome = f"task {task}, notify failed"
                return _after(run, step, step.on_error)
        if step.wait and step.timeout is not None:
            st.step_deadline = workflow.now() + parse_duration(step.timeout)
            run.publish_position()
    if not step.wait:
        run.outcome = f"task {task}"
        return _after(run, step, step.next)
    closed = lambda: str(task) in st.closed_tasks  # noqa: E731
    if not closed():
        if st.step_deadline is not None:
            label = run.label(step.id, f"task {task} (timeout {step.timeout})")
            if await _wait_until_deadline(run, lambda: bool(st.pending) or closed(), label):
                st.results[step.id]["outcome"] = "timeout"
                run.outcome = "timeout"
                return _after(run, step, step.on_timeout or step.next)
        else:
            await workflow.wait_condition(
                lambda: (
                    bool(st.pending)
                    or closed()
                    or st.steer is not None
                    or run.continue_as_new_due()
                )
            )
        if not closed():
            return STAY
    st.results[step.id]["outcome"] = st.closed_tasks[str(task)]
    run.outcome = f"closed: {st.closed_tasks[str(task)]}"
    return _after(run, step, step.next)


HANDLERS: dict[str, Callable[[Any, Any], Awaitable[str]]] = {
    "wait": wait,
    "wait_for": wait_for,
    "branch": branch,
    "send": send,
    "exit": exit_,
    "split": split,
    "holdout": holdout,
    "goto": goto,
    "update_profile": update_profile,
    "score": score,
    "webhook": webhook,
    "handoff": handoff,
}


def deadline_for(step: Step) -> timedelta | None:
    if isinstance(step, WaitStep):
        return parse_duration(step.duration) if step.duration else None
    if isinstance(step, WaitForStep):
        return parse_duration(step.timeout)
    return None
