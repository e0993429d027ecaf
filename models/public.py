"""Request and response bodies of the API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le
from pydantic import BaseModel, ConfigDict, Field

from models.journey import ChannelName
from models.runtime import RunFailure, SteerRecord, StepRecord

# Integers as PostgreSQL stores them: a path, query or body integer past its column's type is
# a 400 naming the parameter, not an overflow in the driver (a 500).
BigInt = Annotated[int, Ge(-(2**63)), Le(2**63 - 1)]  # bigint columns: ids of events, ...
Int32 = Annotated[int, Ge(-(2**31)), Le(2**31 - 1)]  # integer columns: versions, counts


class Accepted(BaseModel):
    success: bool = True


class ErrorBody(BaseModel):
    code: str
    message: str


class IdentityPublic(BaseModel):
    kind: str
    value: str


class CustomerPublic(BaseModel):
    id: str
    traits: dict[str, Any]
    timezone: str | None
    created_at: datetime
    updated_at: datetime
    identities: list[IdentityPublic]


class EventPublic(BaseModel):
    id: int
    message_id: str
    type: str
    event: str | None
    timestamp: datetime
    received_at: datetime
    routed: bool
    properties: dict[str, Any]
    traits: dict[str, Any]
    not_entered: dict[str, str] = Field(
        default={}, description="journeys this event would have entered, and why it did not"
    )


class MessagePublic(BaseModel):
    id: int
    idempotency_key: str
    channel: str
    journey_id: str | None
    journey_version: int | None
    step_id: str | None
    subject: str | None
    body: str
    html: str | None = None
    status: str
    skip_reason: str | None = None
    category: str = "marketing"
    test: bool = False
    error: str | None = Field(default=None, description="the provider's last error, if any")
    created_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None = None
    opened_at: datetime | None = None
    clicked_at: datetime | None = None
    read_at: datetime | None = None


class InboxItem(BaseModel):
    """An in-app message as an app shows it."""

    id: int
    subject: str | None
    body: str
    html: str | None
    journey_id: str | None
    created_at: datetime
    read_at: datetime | None


class InboxPage(BaseModel):
    items: list[InboxItem]
    unread: int
    next_before: int | None = None


class JourneyRunPublic(BaseModel):
    journey_id: str
    version: int
    workflow_id: str
    run_id: str | None
    status: str
    current_step: str | None
    step_deadline: datetime | None
    exit_reason: str | None
    started_at: datetime
    ended_at: datetime | None
    history: list[StepRecord]
    results: dict[str, Any] = {}
    steered: list[SteerRecord] = []
    failures: int = Field(default=0, description="sends of this run that failed")
    failed: list[RunFailure] = Field(default=[], description="the last failures, newest last")
    stale: bool = Field(
        default=False,
        description="the live view could not be read from the workflow: this is the stored row "
        "(no current step, no history); `stale_reason` says why",
    )
    stale_reason: str | None = None


class VersionPublic(BaseModel):
    version: int
    created_at: datetime
    live_runs: int


class JourneyPublic(BaseModel):
    id: str
    name: str
    status: str
    current_version: int
    live_runs: int
    definition: dict[str, Any] | None
    has_draft: bool = False
    versions: list[VersionPublic] = []
    warnings: list[str] = Field(
        default_factory=list,
        description="publish answers only: what is valid but probably not meant "
        "(models.validation.warnings)",
    )
    runs: dict[str, int] = Field(
        default={},
        description="runs by status: running, held (live runs of a paused journey), completed, "
        "completed_with_failures, exited, failed",
    )
    not_entered: dict[str, int] = Field(
        default={}, description="entry events that did not enter, by reason (e.g. paused)"
    )


class ValidationReport(BaseModel):
    valid: bool
    errors: list[str]
    warnings: list[str] = Field(
        default_factory=list,
        description="valid but probably not meant, e.g. reading the entry event after a "
        "wait_for (models.validation.warnings)",
    )


class LifecycleRequest(BaseModel):
    in_flight: Literal["hold", "exit", "finish"] = Field(
        default="hold",
        description="pause: hold (wait before their next step until resumed) or exit; "
        "archive: finish (runs go on to their end) or exit",
    )
    reason: str = Field(default="journey paused", max_length=500)


class LifecycleResult(BaseModel):
    id: str
    status: str
    runs_affected: int


class EventPage(BaseModel):
    items: list[EventPublic]
    next_before: int | None = None


class MessagePage(BaseModel):
    items: list[MessagePublic]
    next_before: int | None = None


class EnrollRequest(BaseModel):
    customer: str = Field(description="customer id, userId, anonymousId or email")
    idempotency_key: str = Field(min_length=1, max_length=200)
    context: dict[str, Any] = Field(
        default_factory=dict, description="available to the journey as entry.properties"
    )


class EnrollmentPublic(BaseModel):
    enrollment_id: str
    workflow_id: str
    customer_id: str
    journey_id: str
    version: int
    status: str
    created: bool


class MigrationRequest(BaseModel):
    from_version: Int32 = Field(ge=1)
    to_version: Int32 | None = Field(default=None, description="default: the current version")
    step_map: dict[str, str] = Field(
        min_length=1, description="step in from_version → step in to_version"
    )
    dry_run: bool = True
    reason: str = Field(default="version migration", max_length=500)


class MigrationReport(BaseModel):
    from_version: int
    to_version: int
    dry_run: bool
    would_move: dict[str, int] = Field(description="per current step, runs that (would) move")
    staying: dict[str, int] = Field(description="per current step, runs left on from_version")
    moved: int
    failed: int


TEMPLATE_ID = r"^[a-z0-9][a-z0-9_\-]*$"


class TemplateUpdate(BaseModel):
    """A new version's content (and optionally a new display name)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    subject: str | None = Field(default=None, description="template (email subject, push title)")
    body: str = Field(description="template; the text part")
    html: str | None = Field(default=None, description="template; the HTML part (email)")


class TemplateCreate(TemplateUpdate):
    id: str = Field(pattern=TEMPLATE_ID, max_length=64)
    channel: ChannelName


class TemplateVersionSummary(BaseModel):
    version: int
    created_at: datetime


class TemplatePublic(BaseModel):
    id: str
    name: str
    channel: str
    current_version: int
    created_at: datetime
    updated_at: datetime


class TemplateVersionPublic(BaseModel):
    template_id: str
    version: int
    channel: str
    subject: str | None
    body: str
    html: str | None
    created_at: datetime | None


class TemplateDetail(TemplatePublic):
    """The template, its current content, and every version."""

    subject: str | None
    body: str
    html: str | None
    versions: list[TemplateVersionSummary]


class TemplatePreviewRequest(BaseModel):
    customer_id: str = Field(description="customer id, userId, anonymousId or email")
    version: Int32 | None = Field(default=None, ge=1, description="default: the current version")
    event: dict[str, Any] = Field(
        default_factory=dict, description="what the template sees as `event` (the entry event)"
    )


class TemplateTestSendRequest(BaseModel):
    to: str = Field(min_length=1, max_length=512, description="address on the template's channel")
    customer_id: str | None = Field(
        default=None, description="whose profile to render with; default: an empty profile"
    )
    version: Int32 | None = Field(default=None, ge=1, description="default: the current version")
    event: dict[str, Any] = Field(default_factory=dict)


class RenderedTemplate(BaseModel):
    template_id: str
    version: int
    channel: str
    customer_id: str | None
    subject: str | None
    body: str
    html: str | None


class TemplateTestSendResult(RenderedTemplate):
    message_id: int
    idempotency_key: str
    to: str
    status: str
    provider_id: str | None


class StepChannelStats(BaseModel):
    step_id: str | None
    channel: str
    messages: int
    sent: int
    in_flight: int
    failed: int
    bounced: int
    delivered: int
    opened: int
    clicked: int
    read: int
    skipped: dict[str, int] = Field(description="skipped sends by reason")
    failures: dict[str, int] = Field(
        default={},
        description="failed sends by reason: template_error, rejected (provider refusal), "
        "abandoned (run ended outside our code), ...",
    )
    delivery_rate: float | None
    open_rate: float | None
    click_rate: float | None
    bounce_rate: float | None


class ChannelReport(BaseModel):
    journey_id: str
    version: int | None
    steps: list[StepChannelStats]
