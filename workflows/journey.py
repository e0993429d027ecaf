"""JourneyWorkflow: one definition, one customer, one durable run (continued as new when long)."""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from core.temporal import (
        CUSTOMER_ID,
        CUSTOMER_REFS,
        JOURNEY_ID,
        JOURNEY_STATUS,
        JOURNEY_STEP,
        JOURNEY_VERSION,
    )
    from models.durations import parse_duration
    from models.journey import JourneyDefinition
    from models.runtime import (
        CustomerRefs,
        JourneyEvent,
        JourneyRunInput,
        JourneyRunResult,
        JourneyState,
        RunFailure,
        RunFinished,
        RunSummary,
        SteerCommand,
        SteerRecord,
        StepRecord,
        TaskClosed,
        customer_refs,
        fit,
    )
    from workflows.steps import (
        ACTIVITY_RETRY,
        DB_ACTIVITY_TIMEOUT,
        END,
        HANDLERS,
        STAY,
        deadline_for,
    )

SEEN_LIMIT = 1000
INBOX_LIMIT = 100
# State is bounded in bytes, not only in count (a goto may loop 1,000 times; a webhook answer
# may be large), because it is carried through every continue-as-new. Runs started before
# this patch keep their unbounded state until they continue as new (replay stays the same).
BOUNDED_STATE = "journey-bounded-state"
HISTORY_KEEP = 100  # step records kept; older ones are counted in `history_dropped`
RESULT_BYTES = 16 * 1024  # per `results.<step>`, as JSON; larger parts become a marker
HISTORY_BYTES_LIMIT = 2 * 1024 * 1024  # continue-as-new once the history is this large
# What operators see: `JourneyStatus` says held / completed_with_failures / failed, a step whose
# activity fails for good ends the run as `failed` (recorded) instead of failing the workflow,
# `CustomerRefs` is upserted, timer and activity summaries name the step. Runs started before
# this patch replay their recorded commands unchanged.
VISIBLE_STATUS = "journey-visible-status"
FAILURES_KEEP = 20  # failure records kept in the state (all are counted in `failures`)


def workflow_id_for(journey_id: str, customer_id: str, run_key: str | None = None) -> str:
    """One live run per (journey, customer[, run key]); easy to find by prefix in the UI."""
    base = f"journey-{journey_id}-{customer_id}"
    return f"{base}-{run_key}" if run_key else base


@workflow.defn(name="JourneyWorkflow")
class JourneyWorkflow:
    @workflow.init
    def __init__(self, inp: JourneyRunInput) -> None:
        self.journey: JourneyDefinition = inp.journey
        self.customer_id = inp.customer_id
        self.history_limit = inp.history_limit
        self.state: JourneyState = inp.state or JourneyState(
            enrollment_id=inp.enrollment_id, entered_at=workflow.now()
        )
        if inp.state is None:
            self.state.pending.extend(inp.events)
            self.state.refs = customer_refs(inp.customer_refs)
        self.outcome: str | None = None
        self.bounded = False  # set at the start of `run`: see BOUNDED_STATE
        self.visible = False  # set at the start of `run`: see VISIBLE_STATUS

    # -- signals, queries -------------------------------------------------------------
    @workflow.signal
    def events(self, events: list[JourneyEvent]) -> None:
        self.state.pending.extend(events)

    @workflow.signal
    def hold(self, held: bool) -> None:
        """The journey was paused (True) or resumed (False). Kept for callers and histories
        from before `pause_run` / `resume_run`, which name the two apart in the timeline."""
        self.state.held = held
        self.publish_position()

    @workflow.signal
    def pause_run(self) -> None:
        """The journey was paused: hold before the next step until `resume_run`."""
        self.state.held = True
        self.publish_position()

    @workflow.signal
    def resume_run(self) -> None:
        """The journey was resumed (or archived with `finish`): go on."""
        self.state.held = False
        self.publish_position()

    @workflow.signal
    def refs(self, refs: CustomerRefs) -> None:
        """The customer's identities changed (an identify or alias added one, a merge moved
        this run): keep `CustomerRefs` (and `CustomerId`) current for operators' queries."""
        self.customer_id = refs.customer_id
        self.state.refs = customer_refs(refs.refs)
        workflow.upsert_search_attributes(
            [
                CUSTOMER_ID.value_set(self.customer_id),
                CUSTOMER_REFS.value_set(self.state.refs),
            ]
        )
        self.publish_details()

    @workflow.signal
    def task_closed(self, closed: TaskClosed) -> None:
        self.state.closed_tasks[str(closed.task_id)] = closed.outcome

    @workflow.signal
    def reassign(self, customer_id: str) -> None:
        """The customer was merged into another profile: follow the surviving id."""
        self.customer_id = customer_id
        workflow.upsert_search_attributes([CUSTOMER_ID.value_set(customer_id)])

    @workflow.update
    async def steer(self, cmd: SteerCommand) -> RunSummary:
        """Exit the run, skip the current wait, or move to a step; applied between steps."""
        self.state.steer = cmd
        await workflow.wait_condition(lambda: self.state.steer is None)
        return self.summary()

    @steer.validator
    def _check_steer(self, cmd: SteerCommand) -> None:
        st = self.state
        if st.status != "running" or st.step_id is None:
            raise ValueError(f"the run is {st.status}; nothing to steer")
        if st.steer is not None:
            raise ValueError("another instruction is being applied")
        if cmd.action == "move":
            if cmd.step_id is None:
                raise ValueError("move needs step_id")
            try:
                self.journey.step(cmd.step_id)
            except KeyError:
                version = self.journey.version
                raise ValueError(f"no step {cmd.step_id!r} in version {version}") from None
        if cmd.action == "migrate":
            new = cmd.definition
            if new is None or new.id != self.journey.id or new.version <= self.journey.version:
                raise ValueError("migrate needs a later version of this journey")
            if cmd.step_id is None or cmd.step_id not in {s.id for s in new.steps}:
                raise ValueError(f"no step {cmd.step_id!r} in version {new.version}")
        if cmd.action == "skip" and self.journey.step(st.step_id).kind not in ("wait", "wait_for"):
            raise ValueError(f"step {st.step_id!r} is not a wait")

    @workflow.query
    def summary(self) -> RunSummary:
        return RunSummary(
            journey_id=self.journey.id,
            version=self.journey.version,
            customer_id=self.customer_id,
            status=self.display_status(),
            step_id=self.state.step_id,
            step_deadline=self.state.step_deadline,
            exit_reason=self.state.exit_reason,
            history=self.state.history,
            history_dropped=self.state.history_dropped,
            results=self.state.results,
            steered=self.state.steered,
            held=self.state.held,
            failures=self.state.failures,
            failed=self.state.failed,
            customer_refs=self.state.refs,
        )

    def display_status(self) -> str:
        """`held` for a running run of a paused journey; otherwise the run's own status."""
        st = self.state
        return "held" if st.held and st.status == "running" else st.status

    # -- the interpreter --------------------------------------------------------------
    @workflow.run
    async def run(self, inp: JourneyRunInput) -> JourneyRunResult:
        st = self.state
        self.bounded = workflow.patched(BOUNDED_STATE)
        self.visible = workflow.patched(VISIBLE_STATUS)
        if inp.state is None:
            self._take_entry()
            self._enter(self.journey.steps[0].id)
        self.publish_position()
        while True:
            # Drain first: signals delivered with the start are already queued here.
            self._drain()
            if st.status == "running" and st.steer is not None:
                self._apply_steer()
            if st.status != "running":
                break
            if st.step_id is None:
                st.status = "completed"
                break
            self._bound_state()
            if self.continue_as_new_due():
                await workflow.wait_condition(workflow.all_handlers_finished)
                st.continued += 1
                workflow.continue_as_new(
                    JourneyRunInput(
                        journey=self.journey,
                        customer_id=self.customer_id,
                        enrollment_id=st.enrollment_id,
                        state=st,
                        history_limit=self.history_limit,
                    )
                )
            if st.held:
                # Paused journey: no step runs until it is resumed; exits still apply.
                await workflow.wait_condition(
                    lambda: (
                        not st.held
                        or bool(st.pending)
                        or st.steer is not None
                        or self.continue_as_new_due()
                    )
                )
                continue
            step = self.journey.step(st.step_id)
            self.outcome = None
            try:
                target = await HANDLERS[step.kind](self, step)
            except ActivityError as err:
                if not self.visible:
                    raise  # recorded histories failed the workflow here
                self._fail(step.id, err)
                continue
            if target == STAY:
                continue
            self._enter(None if target == END else target)
        if self.visible and st.status == "completed" and st.failures:
            st.status = "completed_with_failures"
        self._close_step()
        self._bound_state()
        st.step_id = None  # the history keeps where the run ended
        st.step_deadline = None
        self.publish_position()
        # Events this run will not use (they came with or after its end) go back to the
        # router, which may start a new run with them (e.g. a new cart right after an order).
        release = self._leftovers()
        await workflow.execute_activity(
            "record_run_finished",
            RunFinished(
                enrollment_id=st.enrollment_id,
                workflow_id=workflow.info().workflow_id,
                customer_id=self.customer_id,
                journey_id=self.journey.id,
                status=st.status,
                exit_reason=st.exit_reason,
                goal_at=st.goal_at,
                arm=st.arm,
                holdout=st.holdout,
                release=release,
                failures=st.failures,
            ),
            start_to_close_timeout=DB_ACTIVITY_TIMEOUT,
            retry_policy=ACTIVITY_RETRY,
            summary="record run finished",
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        while late := self._leftovers():
            await workflow.execute_activity(
                "release_events",
                late,
                start_to_close_timeout=DB_ACTIVITY_TIMEOUT,
                retry_policy=ACTIVITY_RETRY,
                summary="release events",
            )
            await workflow.wait_condition(workflow.all_handlers_finished)
        self._log("journey.finished", status=st.status, reason=st.exit_reason)
        return JourneyRunResult(
            status=st.status,
            exit_reason=st.exit_reason,
            sends=st.send_seq,
            steps=[h.step_id for h in st.history],
            continued=st.continued,
            steps_dropped=st.history_dropped,
            failures=st.failures,
        )

    # -- helpers used by step handlers -------------------------------------------------
    def context(self) -> dict[str, Any]:
        """What conditions read (models.context): `event` is the entry event until a matcher
        puts the event it tests there; `trigger` is the event the last wait_for matched."""
        st = self.state
        entry = st.entry.as_context() if st.entry else {}
        trigger = st.trigger.as_context() if st.trigger else entry
        return {"entry": entry, "results": st.results, "event": entry, "trigger": trigger}

    def exit(self, reason: str) -> None:
        self.state.status = "exited"
        self.state.exit_reason = reason

    def record_failure(
        self, step_id: str, reason: str, *, channel: str | None = None, error: str | None = None
    ) -> None:
        """Count a send that failed (the run ends `completed_with_failures`, not `completed`)."""
        st = self.state
        st.failures += 1
        st.failed.append(
            RunFailure(
                step_id=step_id,
                channel=channel,
                reason=reason,
                error=error[:500] if error else None,
                at=workflow.now(),
            )
        )
        del st.failed[:-FAILURES_KEEP]
        self._log("journey.step_failed", step=step_id, reason=reason, channel=channel)

    def label(self, step_id: str, text: str) -> str:
        """A timer's or activity's summary in the UI: which step it belongs to."""
        return f"{step_id}: {text}" if self.visible else text

    def _fail(self, step_id: str, err: ActivityError) -> None:
        """A step's activity failed for good (retries used up or not retryable) and the step
        has no way around it: the run ends `failed`, recorded, instead of the workflow
        failing with nothing written."""
        cause = err.cause or err
        self.state.status = "failed"
        self.state.exit_reason = f"step {step_id!r}: {cause}"[:1000]
        self.outcome = "failed"
        self._log("journey.failed", step=step_id, error=str(cause))

    def continue_as_new_due(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self.history_limit
            or (self.bounded and info.get_current_history_size() >= HISTORY_BYTES_LIMIT)
        )

    # -- internals ----------------------------------------------------------------------
    def _bound_state(self) -> None:
        """Keep what continue-as-new carries small: the last HISTORY_KEEP step records (the
        rest counted) and each step result within RESULT_BYTES. Only in runs that started
        with BOUNDED_STATE, so older histories replay as recorded."""
        if not self.bounded:
            return
        st = self.state
        for key, value in st.results.items():
            st.results[key] = fit(value, RESULT_BYTES)
        excess = len(st.history) - HISTORY_KEEP
        if excess > 0:
            del st.history[:excess]
            st.history_dropped += excess

    def _apply_steer(self) -> None:
        st = self.state
        cmd = st.steer
        assert cmd is not None and st.step_id is not None
        st.steered.append(
            SteerRecord(
                **cmd.model_dump(exclude={"definition"}),
                at=workflow.now(),
                from_step=st.step_id,
                from_version=self.journey.version,
            )
        )
        self.outcome = f"operator {cmd.action}: {cmd.reason}"
        self._log("journey.steered", action=cmd.action, reason=cmd.reason, by=cmd.by)
        step = self.journey.step(st.step_id)
        if cmd.action == "exit":
            self.exit(f"operator: {cmd.reason}")
        elif cmd.action == "move":
            self._enter(cmd.step_id)
        elif cmd.action == "migrate":
            assert cmd.definition is not None
            self.journey = cmd.definition  # recorded in history: replay applies it the same way
            self._enter(cmd.step_id)
        else:
            target = (
                getattr(step, "on_timeout", None)
                or getattr(step, "next", None)
                or self.journey.following(step.id)
            )
            st.results[step.id] = {"outcome": "skipped", "reason": cmd.reason}
            self._enter(None if target == "end" else target)
        st.steer = None

    def _take_entry(self) -> None:
        st = self.state
        # The enrollment id is the workflow id + ":" + the entry event's messageId.
        own = st.enrollment_id.removeprefix(workflow.info().workflow_id + ":")
        mine = [i for i, e in enumerate(st.pending) if e.message_id == own]
        if mine:
            i = mine[0]
            st.entry = st.pending[i]
            st.seen.append(st.entry.message_id)
            del st.pending[: i + 1]
            return
        for i, event in enumerate(st.pending):
            # An API enrollment carries its context as an `enroll` event.
            if event.type == "enroll" or self.journey.entry.matches(event.as_context()):
                st.entry = event
                st.seen.append(event.message_id)
                del st.pending[: i + 1]
                return

    def _leftovers(self) -> list[str]:
        st = self.state
        ids = st.unused + [e.message_id for e in st.pending if e.message_id not in st.seen]
        st.unused = []
        st.pending = []
        return ids

    def _drain(self) -> None:
        """Apply pending events in order. Stops after an event the current step may consume
        (wait_for), so the step sees events one at a time, as if they came one by one."""
        st = self.state
        consuming = st.step_id is not None and self.journey.step(st.step_id).kind == "wait_for"
        while st.pending:
            event = st.pending.pop(0)
            if event.message_id in st.seen:
                continue  # delivered twice (outbox relay retried): applied once
            st.seen.append(event.message_id)
            if st.status != "running":
                st.unused.append(event.message_id)
                continue
            ctx = event.as_context()
            goal = self.journey.goal
            if (
                goal is not None
                and st.goal_at is None
                and workflow.now() - st.entered_at <= parse_duration(goal.within)
                and goal.matches(ctx, self.context())
            ):
                st.goal_at = workflow.now()
                st.results["goal"] = {"at": st.goal_at.isoformat(), "event": ctx}
                self._log("journey.goal", event=event.event, message_id=event.message_id)
                if goal.exit:
                    self.exit("goal")
                    continue
            rule = next((m for m in self.journey.exit_on if m.matches(ctx, self.context())), None)
            if rule is not None:
                self.exit(f"exit_on:{rule.event or rule.type}")
                self._log("journey.exit_on", event=event.event, message_id=event.message_id)
                continue
            st.inbox.append(event)
            st.received.append(event)
            if consuming:
                break
        del st.seen[:-SEEN_LIMIT]
        del st.inbox[:-INBOX_LIMIT]
        del st.received[:-INBOX_LIMIT]

    def _close_step(self) -> None:
        st = self.state
        if st.history and st.history[-1].left_at is None:
            st.history[-1].left_at = workflow.now()
            st.history[-1].outcome = self.outcome or (
                st.exit_reason if st.status == "exited" else "done"
            )

    def _enter(self, step_id: str | None) -> None:
        st = self.state
        self._close_step()
        st.step_id = step_id
        st.inbox = []  # only events after a step starts count for it
        st.step_deadline = None
        if step_id is None:
            return
        step = self.journey.step(step_id)
        delay = deadline_for(step)
        if delay is not None:
            st.step_deadline = workflow.now() + delay
        st.history.append(StepRecord(step_id=step_id, kind=step.kind, entered_at=workflow.now()))
        self.publish_position()
        self._log("journey.step", step=step_id, kind=step.kind)

    def _step_label(self) -> str:
        st = self.state
        return st.step_id or ("(finished)" if st.status != "running" else "(start)")

    def publish_position(self) -> None:
        st = self.state
        attributes = [
            CUSTOMER_ID.value_set(self.customer_id),
            JOURNEY_ID.value_set(self.journey.id),
            JOURNEY_VERSION.value_set(self.journey.version),
            JOURNEY_STEP.value_set(self._step_label()),
            JOURNEY_STATUS.value_set(self.display_status() if self.visible else st.status),
        ]
        if self.visible and st.refs:
            attributes.append(CUSTOMER_REFS.value_set(st.refs))
        workflow.upsert_search_attributes(attributes)
        self.publish_details()

    def publish_details(self) -> None:
        """The run's current details in the UI: the customer as operators know them."""
        st = self.state
        until = f" until {st.step_deadline.isoformat()}" if st.step_deadline else ""
        reason = f" ({st.exit_reason})" if st.exit_reason else ""
        reason += " · journey paused" if st.held and st.status == "running" else ""
        failed = f" · failed sends: {st.failures}" if st.failures else ""
        known = ", ".join(f"`{r}`" for r in st.refs[:3])
        who = f"{known} (id `{self.customer_id}`)" if known else f"`{self.customer_id}`"
        workflow.set_current_details(
            f"**{self.journey.name}** v{self.journey.version} · customer {who}\n\n"
            f"status: {self.display_status()}{reason} · step: `{self._step_label()}`{until}"
            f" · sends: {st.send_seq}{failed}"
        )

    def _log(self, msg: str, **fields: Any) -> None:
        workflow.logger.info(
            msg,
            extra={
                "journey": {
                    "customer_id": self.customer_id,
                    "journey_id": self.journey.id,
                    "journey_version": self.journey.version,
                    **fields,
                }
            },
        )
