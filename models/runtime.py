"""Payloads that cross the workflow boundary. Pure pydantic: imported inside the sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from models.journey import JourneyDefinition, Template
from models.loading import runtime_model

# A definition read back from workflow history (input, continue-as-new state, a migrate
# update): loaded leniently, so a later release's stricter schema never fails a run in flight.
RuntimeDefinition = runtime_model(JourneyDefinition)


class JourneyEvent(BaseModel):
    """An event as a journey sees it (a slice of the stored Segment envelope)."""

    message_id: str
    type: str
    event: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)
    traits: dict[str, Any] = Field(default_factory=dict)
    timestamp: datetime
    customer_id: str

    def as_context(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "event": self.event,
            "properties": self.properties,
            "traits": self.traits,
            "timestamp": self.timestamp.isoformat(),
            "message_id": self.message_id,
        }


class StepRecord(BaseModel):
    step_id: str
    kind: str
    entered_at: datetime
    left_at: datetime | None = None
    outcome: str | None = None


# What a run is, as the API and the `JourneyStatus` search attribute say it: `held` is a running
# run of a paused journey; `completed_with_failures` went to its end with failed sends;
# `failed` could not go on (a step's activity failed for good).
RunStatus = Literal["running", "held", "completed", "completed_with_failures", "exited", "failed"]
REF_LIMIT = 50  # CustomerRefs values per run (search attributes are capped in total size)
REF_CHARS = 256


class SteerCommand(BaseModel):
    """An operator's instruction to a run in flight (a workflow update)."""

    action: Literal["exit", "skip", "move", "migrate"]
    step_id: str | None = Field(default=None, description="target step, for move and migrate")
    reason: str = Field(min_length=1, max_length=500)
    by: str | None = None
    definition: RuntimeDefinition | None = Field(
        default=None, description="migrate: the version to move to (its step_id)"
    )


class SteerRecord(SteerCommand):
    at: datetime
    from_step: str | None
    from_version: int | None = None


class RunFailure(BaseModel):
    """A send that did not go out for a reason of ours or the provider's (not a skip)."""

    step_id: str
    channel: str | None = None
    reason: str
    error: str | None = None
    at: datetime


class JourneyState(BaseModel):
    """Everything a run needs to go on after continue-as-new."""

    enrollment_id: str
    entered_at: datetime
    entry: JourneyEvent | None = None
    trigger: JourneyEvent | None = Field(
        default=None,
        description="the event the last wait_for matched (`trigger` in conditions and "
        "templates; None: the entry event)",
    )
    status: RunStatus = "running"
    exit_reason: str | None = None
    step_id: str | None = None
    step_deadline: datetime | None = None
    send_seq: int = 0
    pending: list[JourneyEvent] = Field(default_factory=list)
    inbox: list[JourneyEvent] = Field(default_factory=list)
    received: list[JourneyEvent] = Field(
        default_factory=list, description="events since entry (bounded), for since: entry"
    )
    seen: list[str] = Field(default_factory=list, description="recent message ids, for dedupe")
    results: dict[str, Any] = Field(default_factory=dict)
    history: list[StepRecord] = Field(default_factory=list)
    history_dropped: int = Field(default=0, description="oldest step records not kept")
    continued: int = 0
    effect_seq: int = 0
    loops: dict[str, int] = Field(default_factory=dict)
    holdout: bool = False
    arm: str | None = None
    goal_at: datetime | None = None
    steer: SteerCommand | None = None
    closed_tasks: dict[str, str | None] = Field(default_factory=dict)
    held: bool = Field(default=False, description="journey paused: hold before the next step")
    unused: list[str] = Field(
        default_factory=list, description="ids of events that came after the end, to release"
    )
    steered: list[SteerRecord] = Field(default_factory=list)
    failures: int = Field(default=0, description="sends that failed (see RunFailure)")
    failed: list[RunFailure] = Field(
        default_factory=list, description="the last failures (bounded), newest last"
    )
    refs: list[str] = Field(
        default_factory=list, description="the customer's userIds, anonymousIds, emails"
    )


def customer_refs(values: list[str]) -> list[str]:
    """The values of `CustomerRefs`: distinct, in order, each short enough for a keyword and
    at most REF_LIMIT of them (the caller puts userIds and emails first)."""
    out: list[str] = []
    for v in values:
        if isinstance(v, str) and 0 < len(v) <= REF_CHARS and v not in out:
            out.append(v)
    return out[:REF_LIMIT]


def json_size(value: Any) -> int:
    """Bytes of `value` as JSON, the way it is carried in workflow history."""
    return len(json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False).encode())


def fit(value: Any, limit: int) -> Any:
    """`value` within `limit` bytes of JSON: the largest parts of a mapping are shrunk first
    (so small fields such as a webhook's `status` stay readable), and whatever still does not
    fit becomes `{"truncated": true, "bytes": <its size>}`."""
    size = json_size(value)
    if size <= limit:
        return value
    if isinstance(value, dict):
        out = dict(value)
        for key in sorted(out, key=lambda k: -json_size(out[k])):
            excess = json_size(out) - limit
            if excess <= 0:
                break
            out[key] = fit(out[key], max(json_size(out[key]) - excess, 0))
        if json_size(out) <= limit:
            return out
    return {"truncated": True, "bytes": size}


class JourneyRunInput(BaseModel):
    journey: RuntimeDefinition
    customer_id: str
    enrollment_id: str
    state: JourneyState | None = None
    history_limit: int = 2000
    events: list[JourneyEvent] = Field(
        default_factory=list, description="the entry event and what came with it"
    )
    customer_refs: list[str] = Field(
        default_factory=list, description="userIds, anonymousIds, emails known at the start"
    )


class JourneyRunResult(BaseModel):
    status: RunStatus
    exit_reason: str | None
    sends: int
    steps: list[str]
    continued: int = 0
    steps_dropped: int = Field(default=0, description="steps entered before `steps` starts")
    failures: int = 0


class RunSummary(BaseModel):
    """What the `summary` query returns: readable in the UI and the API."""

    journey_id: str
    version: int
    customer_id: str
    status: RunStatus
    step_id: str | None
    step_deadline: datetime | None
    exit_reason: str | None
    history: list[StepRecord]
    history_dropped: int = 0
    results: dict[str, Any]
    steered: list[SteerRecord] = Field(default_factory=list)
    held: bool = False
    failures: int = 0
    failed: list[RunFailure] = Field(default_factory=list)
    customer_refs: list[str] = Field(default_factory=list)


class CustomerRefs(BaseModel):
    """The `refs` signal: the customer's identities changed (identify, alias, merge)."""

    customer_id: str
    refs: list[str]


class ProfileSnapshot(BaseModel):
    customer_id: str
    traits: dict[str, Any]
    stats: dict[str, Any]

    def as_context(self) -> dict[str, Any]:
        return {"customer_id": self.customer_id, "traits": self.traits, "stats": self.stats}


class QuietRequest(BaseModel):
    customer_id: str
    now: datetime
    start: str
    end: str


class SendRequest(BaseModel):
    idempotency_key: str
    skip_reason: str | None = Field(
        default=None, description="record the send as skipped for this reason, do not deliver"
    )
    category: Literal["marketing", "transactional"] = "marketing"
    topic: str = "marketing"
    journey_cap: str | None = None
    customer_id: str
    journey_id: str
    journey_version: int
    step_id: str
    workflow_id: str
    channel: str = Field(description="one channel, `best`, or the first of `channels`")
    channels: list[str] = Field(default_factory=list, description="ordered fallback list")
    subject: str | None = None
    body: str | None = None
    html: str | None = None
    template_id: str | None = Field(default=None, description="stored template (pinned)")
    template_version: int | None = None
    variants: dict[str, Template] = Field(
        default_factory=dict, description="content for one channel instead of the above"
    )
    entry: dict[str, Any] | None = None
    trigger: dict[str, Any] | None = Field(default=None, description="None: the entry event")
    results: dict[str, Any] = Field(
        default_factory=dict, description="the results the step's templates read"
    )

    @property
    def candidates(self) -> list[str]:
        return self.channels or [self.channel]


class SendResult(BaseModel):
    message_id: int
    status: str  # sent | failed | skipped | bounced
    duplicate: bool
    # why skipped: no_address | no_consent | suppressed | capped | quiet_hours | holdout
    reason: str | None = None
    channel: str | None = None  # the channel chosen (fallback list / best)
    error: str | None = None  # failed / bounced: what the provider said


class RunFinished(BaseModel):
    enrollment_id: str
    workflow_id: str
    customer_id: str
    journey_id: str
    status: RunStatus
    exit_reason: str | None
    goal_at: datetime | None = None
    arm: str | None = None
    holdout: bool = False
    release: list[str] = Field(default_factory=list, description="event ids to route again")
    failures: int = 0


class ProfileUpdate(BaseModel):
    idempotency_key: str
    customer_id: str
    set: dict[str, Any] = Field(default_factory=dict)
    increment: dict[str, float] = Field(default_factory=dict)
    unset: list[str] = Field(default_factory=list)
    add_tags: list[str] = Field(default_factory=list)
    remove_tags: list[str] = Field(default_factory=list)


class ScoreRequest(BaseModel):
    model: str
    customer_id: str


class ScoreResult(BaseModel):
    model: str
    score: float
    details: dict[str, Any] = Field(default_factory=dict)


class WebhookRequest(BaseModel):
    idempotency_key: str
    customer_id: str
    journey_id: str
    step_id: str
    url: str
    method: str
    headers: dict[str, str]
    payload: dict[str, Any]
    timeout_seconds: float
    entry: dict[str, Any] | None = None
    trigger: dict[str, Any] | None = Field(default=None, description="None: the entry event")
    results: dict[str, Any] = Field(
        default_factory=dict, description="the results the step's templates read"
    )
    journey_version: int | None = None


class WebhookResult(BaseModel):
    status: int
    ok: bool
    body: Any = None


class TaskRequest(BaseModel):
    idempotency_key: str
    customer_id: str
    journey_id: str
    step_id: str
    workflow_id: str
    enrollment_id: str
    queue: str
    title: str
    details: dict[str, Any]
    notify_url: str | None = None
    entry: dict[str, Any] | None = None
    trigger: dict[str, Any] | None = Field(default=None, description="None: the entry event")
    results: dict[str, Any] = Field(
        default_factory=dict, description="the results the step's templates read"
    )
    journey_version: int | None = None


class TaskCreated(BaseModel):
    """`notify_status` / `notify_error`: how the `notify_url` answered (None: no URL);
    `notify_error` set means the notification failed for good (a 4xx, or retries used up)."""

    task_id: int
    notify_status: int | None = None
    notify_error: str | None = None


class TaskClosed(BaseModel):
    task_id: int
    outcome: str | None = None


class WaitRequest(BaseModel):
    """A wait until a local time of day or a date; resolved in an activity because it needs
    the customer's timezone / traits and the tz database (not deterministic across releases)."""

    customer_id: str
    now: datetime
    at: str | None = None
    weekdays: list[str] | None = None
    until: str | None = None
    offset: str | None = None
    entry: dict[str, Any] | None = None


class WaitResolution(BaseModel):
    deadline: datetime | None
    note: str | None = None


class LaunchInput(BaseModel):
    """An audience launch; `launch_id` empty means "make one" (scheduled launches)."""

    journey_id: str
    audience: dict[str, Any] | None = None
    rate_per_second: float = Field(default=50.0, gt=0, le=10_000)
    page_size: int = Field(default=200, ge=1, le=5_000)
    launch_id: str = ""
    schedule_id: str | None = None
    cursor: str | None = None
    enrolled: int = 0
    skipped: int = 0
    pages: int = 0


class AudiencePage(BaseModel):
    launch_id: str
    journey_id: str
    audience: dict[str, Any] | None
    after: str | None
    limit: int


class LaunchProgress(BaseModel):
    launch_id: str
    journey_id: str
    status: str
    enrolled: int
    skipped: int
    cursor: str | None
    pages: int
    error: str | None = Field(default=None, description="why the launch failed, if it did")


class PageResult(BaseModel):
    enrolled: int
    skipped: int
    last: str | None
    count: int
