"""Response bodies of the read API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from models.runtime import SteerRecord, StepRecord


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


class MessagePublic(BaseModel):
    id: int
    idempotency_key: str
    channel: str
    journey_id: str | None
    journey_version: int | None
    step_id: str | None
    subject: str | None
    body: str
    status: str
    created_at: datetime
    sent_at: datetime | None


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


class ValidationReport(BaseModel):
    valid: bool
    errors: list[str]


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
    from_version: int = Field(ge=1)
    to_version: int | None = Field(default=None, description="default: the current version")
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
