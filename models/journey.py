"""The declarative journey definition. One schema class per step kind.

A step goes to `next` when it has one, else to the step after it; past the last step, or at
the target `end`, the run completes. Adding a step kind = one class here + one handler in
`workflows/steps.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.conditions import Condition, evaluate
from models.durations import Duration

END = "end"
EventType = Literal["track", "identify", "page", "screen", "group", "alias"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EventMatch(_Strict):
    """Which events count: a type, an event name (for `track`), and conditions on `event.*`."""

    type: EventType = "track"
    event: str | None = Field(default=None, description="track event name, e.g. Product Added")
    conditions: Condition | None = None

    @model_validator(mode="after")
    def _name_for_track(self) -> EventMatch:
        if self.type == "track" and not self.event:
            raise ValueError("a track match needs an `event` name")
        return self

    def matches(self, event: dict[str, Any], ctx: dict[str, Any] | None = None) -> bool:
        if event.get("type") != self.type:
            return False
        if self.event is not None and event.get("event") != self.event:
            return False
        return evaluate(self.conditions, {**(ctx or {}), "event": event})


class Template(_Strict):
    subject: str | None = None
    body: str


class _Step(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$", max_length=64)
    name: str | None = None


class WaitStep(_Step):
    kind: Literal["wait"]
    duration: Duration
    next: str | None = None


class WaitForOutcome(EventMatch):
    next: str | None = Field(default=None, description="step to go to; default: the next step")


class WaitForStep(_Step):
    kind: Literal["wait_for"]
    events: list[WaitForOutcome] = Field(min_length=1)
    timeout: Duration
    on_timeout: str | None = Field(default=None, description="step on timeout; default: next")


class BranchCase(_Strict):
    when: Condition
    next: str


class BranchStep(_Step):
    """First matching case wins; `else` is required so every customer has a path."""

    kind: Literal["branch"]
    cases: list[BranchCase] = Field(min_length=1)
    else_: str = Field(alias="else")


class SendStep(_Step):
    kind: Literal["send"]
    channel: Literal["outbox"] = "outbox"
    template: Template
    next: str | None = None


class ExitStep(_Step):
    kind: Literal["exit"]
    reason: str = "exit"


Step = Annotated[
    WaitStep | WaitForStep | BranchStep | SendStep | ExitStep, Field(discriminator="kind")
]


class ReEntry(_Strict):
    """`never`: one run per customer ever; `always`: again once the last run ended;
    `after`: again once `after` has passed since the last run started."""

    policy: Literal["never", "always", "after"] = "always"
    after: Duration | None = None

    @model_validator(mode="after")
    def _after_needs_duration(self) -> ReEntry:
        if (self.policy == "after") != (self.after is not None):
            raise ValueError("re_entry.after is required with policy 'after', and only then")
        return self


class JourneyDefinition(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$", max_length=64)
    name: str
    description: str | None = None
    version: int = Field(default=0, description="set by the store when published")
    entry: EventMatch
    exit_on: list[EventMatch] = Field(default_factory=list)
    re_entry: ReEntry = Field(default_factory=ReEntry)
    steps: list[Step] = Field(min_length=1)

    @model_validator(mode="after")
    def _targets_exist(self) -> JourneyDefinition:
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
    return [("next", getattr(step, "next", None))]
