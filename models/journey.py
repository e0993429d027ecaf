"""The declarative journey definition. One schema class per step kind.

A step goes to `next` when it has one, else to the step after it; past the last step, or at
the target `end`, the run completes. Adding a step kind = one class here + one handler in
`workflows/steps.py` + what it stores in `results.<step>` in `models/context.py`
(RESULT_SHAPES), which publish checks conditions and templates against.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, model_validator

from models.conditions import Condition, evaluate
from models.durations import Duration
from models.loading import Checked, DefinitionModel, at_runtime

END = "end"
EventType = Literal["track", "identify", "page", "screen", "group", "alias"]


# Every class here is strict when a definition is published and lenient when a run loads it
# from workflow history (see models.loading): constraints are `Checked`, rules skip at run time.
Slug = Annotated[str, Checked(pattern=r"^[a-z0-9][a-z0-9_\-]*$", max_length=64)]
ClockTime = Annotated[str, Checked(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
HttpUrl = Annotated[str, Checked(pattern=r"^https?://")]


class EventMatch(DefinitionModel):
    """Which events count: a type, an event name (for `track`), and conditions on `event.*`."""

    type: EventType = "track"
    event: str | None = Field(default=None, description="track event name, e.g. Product Added")
    conditions: Condition | None = None

    @model_validator(mode="after")
    def _name_for_track(self, info: ValidationInfo) -> EventMatch:
        if at_runtime(info):
            return self  # checked when published
        if self.type == "track" and not self.event:
            raise ValueError("a track match needs an `event` name")
        return self

    def matches(self, event: dict[str, Any], ctx: dict[str, Any] | None = None) -> bool:
        if event.get("type") != self.type:
            return False
        if self.event is not None and event.get("event") != self.event:
            return False
        return evaluate(self.conditions, {**(ctx or {}), "event": event})


class Template(DefinitionModel):
    """Inline content (`subject`, `body`, `html`), or `ref` to a stored template: publishing
    pins the stored template's current version unless `version` is given."""

    subject: str | None = None
    body: str | None = None
    html: str | None = None
    ref: Slug | None = None
    version: Annotated[int, Checked(ge=1)] | None = None

    @model_validator(mode="after")
    def _inline_or_ref(self, info: ValidationInfo) -> Template:
        if at_runtime(info):
            return self  # checked when published
        if self.ref is None and self.body is None:
            raise ValueError("a template needs `body` (inline) or `ref` (a stored template)")
        if self.ref is not None and (self.body, self.subject, self.html) != (None, None, None):
            raise ValueError("a template has either `ref` or inline `body`/`subject`/`html`")
        if self.ref is None and self.version is not None:
            raise ValueError("`version` goes with `ref`")
        return self


class _Step(DefinitionModel):
    id: Slug
    name: str | None = None


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class WaitStep(_Step):
    """Wait a `duration`; or until a local time of day (`at`, optionally on `weekdays`) in the
    customer's timezone; or until the date at `until` (a path such as
    `entry.properties.start_time` or `profile.traits.renewal_date`) shifted by `offset`.
    A moment already past continues at once."""

    kind: Literal["wait"]
    duration: Duration | None = None
    at: ClockTime | None = None
    weekdays: list[Weekday] | None = None
    until: str | None = Field(default=None, description="path to an ISO-8601 date")
    offset: Annotated[str, Checked(pattern=r"^[+-]?(\d+[smhdw])+$")] | None = None
    next: str | None = None

    @model_validator(mode="after")
    def _one_form(self, info: ValidationInfo) -> WaitStep:
        if at_runtime(info):
            return self  # checked when published
        forms = [self.duration is not None, self.at is not None, self.until is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of duration, at, until")
        if self.weekdays is not None and self.at is None:
            raise ValueError("weekdays goes with at")
        if self.offset is not None and self.until is None:
            raise ValueError("offset goes with until")
        if self.until is not None and self.until.split(".", 1)[0] not in ("entry", "profile"):
            raise ValueError("until must start with entry. or profile.")
        return self


class WaitForOutcome(EventMatch):
    next: str | None = Field(default=None, description="step to go to; default: the next step")
    correlate: list[str] = Field(
        default_factory=list,
        description="property paths that must equal the entry event's, e.g. properties.cart_id",
    )


class WaitForStep(_Step):
    """Wait for any of several events, or the timeout. `since: entry` also counts events that
    arrived after the run entered but before this step started (no lost race)."""

    kind: Literal["wait_for"]
    events: Annotated[list[WaitForOutcome], Checked(min_length=1)]
    since: Literal["step", "entry"] = "step"
    timeout: Duration
    on_timeout: str | None = Field(default=None, description="step on timeout; default: next")


class BranchCase(DefinitionModel):
    when: Condition
    next: str


class BranchStep(_Step):
    """First matching case wins; `else` is required so every customer has a path."""

    kind: Literal["branch"]
    cases: Annotated[list[BranchCase], Checked(min_length=1)]
    else_: str = Field(alias="else")


class QuietHours(DefinitionModel):
    """No send between `start` and `end` (local time in the customer's timezone; may span
    midnight): `wait` until the window ends (a durable timer), or `skip` (recorded)."""

    start: ClockTime
    end: ClockTime
    mode: Literal["wait", "skip"] = "wait"


ChannelName = Literal["outbox", "email", "sms", "push", "webhook", "in_app"]
# One channel; an ordered fallback list (the first the customer can be reached on); or `best`,
# the one they engage with most.
ChannelChoice = ChannelName | Literal["best"] | list[ChannelName]


class SendStep(_Step):
    """`category: transactional` is exempt from consent and frequency caps (not from
    suppression); `topic` is the subscription topic consent is checked against."""

    kind: Literal["send"]
    channel: ChannelChoice = "outbox"
    template: Template
    category: Literal["marketing", "transactional"] = "marketing"
    topic: Slug = "marketing"
    quiet_hours: QuietHours | None = None
    # Content for one channel instead of `template` when the send goes out on it (an SMS text
    # beside the email of a fallback list).
    variants: dict[ChannelName, Template] = Field(default_factory=dict)
    next: str | None = None

    @model_validator(mode="after")
    def _channels(self, info: ValidationInfo) -> SendStep:
        if at_runtime(info):
            return self  # checked when published
        if isinstance(self.channel, list):
            if not self.channel:
                raise ValueError("channel: the fallback list is empty")
            if len(set(self.channel)) != len(self.channel):
                raise ValueError("channel: the fallback list names a channel twice")
        if self.channel != "best":
            for name in self.variants:
                if name not in self.channels:
                    raise ValueError(
                        f"variants.{name}: the step does not send on {name} "
                        f"(channels: {', '.join(self.channels)})"
                    )
        return self

    def templates(self) -> list[tuple[str, Template]]:
        """(field, template) of every template the step may render."""
        return [("template", self.template)] + [
            (f"variants.{name}", t) for name, t in self.variants.items()
        ]

    @property
    def channels(self) -> list[str]:
        """The candidates in order; `best` is ordered at send time."""
        return list(self.channel) if isinstance(self.channel, list) else [self.channel]


class ExitStep(_Step):
    kind: Literal["exit"]
    reason: str = "exit"


class SplitArm(DefinitionModel):
    name: Annotated[str, Checked(pattern=r"^[A-Za-z0-9_\-]+$")]
    weight: Annotated[int, Checked(gt=0)]
    next: str | None = None


class SplitStep(_Step):
    """A/B/n: a customer's arm is a hash of (journey, customer, step), so it is stable."""

    kind: Literal["split"]
    arms: Annotated[list[SplitArm], Checked(min_length=2)]

    @model_validator(mode="after")
    def _unique(self, info: ValidationInfo) -> SplitStep:
        if at_runtime(info):
            return self  # checked when published
        if len({a.name for a in self.arms}) != len(self.arms):
            raise ValueError("arm names must be unique")
        return self


class HoldoutStep(_Step):
    """`percent` of customers become the control: they go on through the journey (same waits,
    same goal tracking) but every later `send` is skipped and recorded as `holdout`."""

    kind: Literal["holdout"]
    percent: Annotated[float, Checked(gt=0, lt=100)]
    next: str | None = None


class UpdateProfileStep(_Step):
    kind: Literal["update_profile"]
    set: dict[str, Any] = Field(default_factory=dict)
    increment: dict[str, float] = Field(default_factory=dict)
    unset: list[str] = Field(default_factory=list)
    add_tags: list[str] = Field(default_factory=list)
    remove_tags: list[str] = Field(default_factory=list)
    next: str | None = None

    @model_validator(mode="after")
    def _something(self, info: ValidationInfo) -> UpdateProfileStep:
        if at_runtime(info):
            return self  # checked when published
        if not (self.set or self.increment or self.unset or self.add_tags or self.remove_tags):
            raise ValueError("update_profile needs set, increment, unset, add_tags or remove_tags")
        return self


class GotoStep(_Step):
    """Jump back (or forward) to `target` at most `max_iterations` times, then go on."""

    kind: Literal["goto"]
    target: str
    max_iterations: Annotated[int, Checked(ge=1, le=1000)]
    next: str | None = None


SCORE_MODELS = ("rfm",)


class ScoreStep(_Step):
    """Call a named model; its result is `results.<step id>` for later conditions."""

    kind: Literal["score"]
    model: str
    next: str | None = None

    @model_validator(mode="after")
    def _known(self, info: ValidationInfo) -> ScoreStep:
        if at_runtime(info):
            return self  # checked when published
        if self.model not in SCORE_MODELS:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(SCORE_MODELS)}")
        return self


class WebhookStep(_Step):
    """POST (or PUT/PATCH/GET) a templated JSON payload; the response is
    `results.<step id>` (`status`, `ok`, `body`). 5xx and timeouts are retried with backoff;
    a 4xx goes to `on_error` (default: the next step), never retried."""

    kind: Literal["webhook"]
    url: HttpUrl
    method: Literal["POST", "PUT", "PATCH", "GET"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    payload: dict[str, Any] = Field(default_factory=dict, description="string values are templates")
    timeout_seconds: Annotated[float, Checked(gt=0, le=60)] = 10
    next: str | None = None
    on_error: str | None = None


class HandoffStep(_Step):
    """Hand the customer to a human: a task in a queue (`GET /v1/tasks`), optionally POSTed to
    `notify_url`; with `wait`, the run holds until the task is closed (`POST
    /v1/tasks/{id}/close`) or `timeout` passes (then `on_timeout`). The notification is bounded
    like the webhook step: a 4xx goes to `on_error` (default: on as usual, the failure recorded
    in `results.<step id>.notify`); 5xx and timeouts are retried with backoff, then recorded the
    same way. The task exists in every case."""

    kind: Literal["handoff"]
    queue: Slug
    title: str = Field(description="template")
    details: dict[str, Any] = Field(default_factory=dict, description="string values are templates")
    notify_url: HttpUrl | None = None
    wait: bool = False
    timeout: Duration | None = None
    next: str | None = None
    on_timeout: str | None = None
    on_error: str | None = Field(default=None, description="where to go if notify_url fails")

    @model_validator(mode="after")
    def _timeout_with_wait(self, info: ValidationInfo) -> HandoffStep:
        if at_runtime(info):
            return self  # checked when published
        if (self.timeout is not None or self.on_timeout is not None) and not self.wait:
            raise ValueError("timeout and on_timeout go with wait: true")
        if self.on_error is not None and self.notify_url is None:
            raise ValueError("on_error goes with notify_url")
        return self


Step = Annotated[
    WaitStep
    | WaitForStep
    | BranchStep
    | SendStep
    | ExitStep
    | SplitStep
    | HoldoutStep
    | UpdateProfileStep
    | GotoStep
    | ScoreStep
    | WebhookStep
    | HandoffStep,
    Field(discriminator="kind"),
]
STEP_KINDS = ("wait", "wait_for", "branch", "send", "exit", "split", "holdout",
              "update_profile", "goto", "score", "webhook", "handoff")  # fmt: skip


class Goal(EventMatch):
    """A conversion: recorded on the run when it happens within `within` of entry."""

    within: Duration = "7d"
    exit: bool = Field(default=True, description="end the run once the goal is reached")


class ReEntry(DefinitionModel):
    """`never`: one run per customer ever; `always`: again once the last run ended;
    `after`: again once `after` has passed since the last run started."""

    policy: Literal["never", "always", "after"] = "always"
    after: Duration | None = None

    @model_validator(mode="after")
    def _after_needs_duration(self, info: ValidationInfo) -> ReEntry:
        if at_runtime(info):
            return self  # checked when published
        if (self.policy == "after") != (self.after is not None):
            raise ValueError("re_entry.after is required with policy 'after', and only then")
        return self


class JourneyDefinition(DefinitionModel):
    id: Slug
    name: str
    description: str | None = None
    version: int = Field(default=0, description="set by the store when published")
    entry: EventMatch
    exit_on: list[EventMatch] = Field(default_factory=list)
    re_entry: ReEntry = Field(default_factory=ReEntry)
    goal: Goal | None = None
    run_key: Annotated[str, Checked(pattern=r"^(properties|traits)\.")] | None = Field(
        default=None,
        description="allow one live run per value of this entry-event path "
        "(e.g. properties.appointment_id) instead of one per customer",
    )
    max_entries: Annotated[int, Checked(ge=1)] | None = Field(
        default=None, description="cap on entries per customer"
    )
    frequency_cap: Annotated[str, Checked(pattern=r"^\d+/(\d+[smhdw])+$")] | None = Field(
        default=None,
        description="marketing messages from this journey per customer, e.g. 1/1d",
    )
    steps: Annotated[list[Step], Checked(min_length=1)]

    @model_validator(mode="after")
    def _targets_exist(self, info: ValidationInfo) -> JourneyDefinition:
        if at_runtime(info):
            return self  # checked when published
        ids: set[str] = set()
        for step in self.steps:
            if step.id == END:
                raise ValueError(f"step {END!r}: the id is reserved for the end of the journey")
            if step.id in ids:
                raise ValueError(f"step {step.id!r}: duplicate step id")
            ids.add(step.id)
        for step in self.steps:
            for field, target in _targets(step):
                if target is not None and target != END and target not in ids:
                    raise ValueError(f"step {step.id!r}: {field} goes to unknown step {target!r}")
        return self

    def steps_order(self, ids: list[str]) -> list[str]:
        """`ids` in definition order (for readable messages)."""
        wanted = set(ids)
        return [s.id for s in self.steps if s.id in wanted]

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def following(self, step_id: str) -> str | None:
        """The step after `step_id` in the list, or None at the end."""
        ids = [s.id for s in self.steps]
        i = ids.index(step_id)
        return ids[i + 1] if i + 1 < len(ids) else None

    def interesting(self) -> list[EventMatch]:
        """Every event match a running journey reacts to (besides its entry)."""
        out: list[EventMatch] = list(self.exit_on)
        if self.goal is not None:
            out.append(self.goal)
        for s in self.steps:
            if isinstance(s, WaitForStep):
                out.extend(s.events)
        return out


def _targets(step: Step) -> list[tuple[str, str | None]]:
    if isinstance(step, WaitForStep):
        return [("on_timeout", step.on_timeout)] + [
            (f"events[{i}].next", o.next) for i, o in enumerate(step.events)
        ]
    if isinstance(step, BranchStep):
        return [("else", step.else_)] + [
            (f"cases[{i}].next", c.next) for i, c in enumerate(step.cases)
        ]
    if isinstance(step, SplitStep):
        return [(f"arms[{i}].next", a.next) for i, a in enumerate(step.arms)]
    if isinstance(step, GotoStep):
        return [("target", step.target), ("next", step.next)]
    if isinstance(step, WebhookStep):
        return [("next", step.next), ("on_error", step.on_error)]
    if isinstance(step, HandoffStep):
        return [("next", step.next), ("on_timeout", step.on_timeout), ("on_error", step.on_error)]
    return [("next", getattr(step, "next", None))]
