"""PostgreSQL tables (SQLModel). Alembic migrations in `migrations/` are generated from these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field, SQLModel

_NOW = sa.text("now()")


def _ts(nullable: bool = False, default: bool = True) -> Any:
    return Field(
        default=None,
        sa_column=sa.Column(
            sa.DateTime(timezone=True), nullable=nullable, server_default=_NOW if default else None
        ),
    )


def _json() -> Any:
    return Field(
        default_factory=dict,
        sa_column=sa.Column(JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    )


class Customer(SQLModel, table=True):
    __tablename__ = "customers"
    # Inbound SMS (STOP/START) finds customers by their phone number, however it is formatted
    # (store.feedback.PHONE_SQL: the same expression, so the query uses this index).
    __table_args__ = (
        sa.Index(
            "ix_customers_phone",
            sa.text("regexp_replace(traits->>'phone', '[^0-9+]', '', 'g')"),
            postgresql_where=sa.text("merged_into IS NULL"),
        ),
        # GET /v1/customers pages newest first (store.listing; migration 0013).
        sa.Index(
            "ix_customers_created",
            "created_at",
            "id",
            postgresql_where=sa.text("merged_into IS NULL"),
        ),
    )
    id: str = Field(primary_key=True, max_length=64)
    traits: dict[str, Any] = _json()
    timezone: str | None = Field(default=None, max_length=64)
    merged_into: str | None = Field(default=None, max_length=64, index=True)
    created_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()


class Identity(SQLModel, table=True):
    """userId / anonymousId / email / phone → customer."""

    __tablename__ = "identities"
    kind: str = Field(primary_key=True, max_length=16)
    value: str = Field(primary_key=True, max_length=512)
    customer_id: str = Field(foreign_key="customers.id", index=True, max_length=64)
    created_at: datetime | None = _ts()


class Event(SQLModel, table=True):
    """The Segment envelope as received. Rows with `routed_at` null are the outbox."""

    __tablename__ = "events"
    __table_args__ = (
        sa.Index("ix_events_customer_time", "customer_id", "timestamp"),
        sa.Index(
            "ix_events_unrouted",
            "timestamp",
            "id",
            postgresql_where=sa.text("routed_at IS NULL"),
        ),
        sa.Index("ix_events_customer_event", "customer_id", "event"),
    )
    id: int | None = Field(
        default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True)
    )
    message_id: str = Field(max_length=512, unique=True)
    type: str = Field(max_length=16)
    event: str | None = Field(default=None, max_length=512)
    user_id: str | None = Field(default=None, max_length=512)
    anonymous_id: str | None = Field(default=None, max_length=512)
    previous_id: str | None = Field(default=None, max_length=512)
    customer_id: str | None = Field(default=None, max_length=64)
    timestamp: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    received_at: datetime | None = _ts()
    routed_at: datetime | None = _ts(nullable=True, default=False)
    # When its traits, timezone and identities were applied to the profile: an event routed
    # again (handed back by a finished run, replayed) must not roll back newer traits.
    applied_at: datetime | None = _ts(nullable=True, default=False)
    payload: dict[str, Any] = _json()


class DeadLetterBase(SQLModel):
    event_id: int = Field(
        sa_column=sa.Column(
            sa.BigInteger, sa.ForeignKey("events.id", ondelete="CASCADE"), nullable=False,
            unique=True,
        )
    )  # fmt: skip
    message_id: str = Field(max_length=512)
    error: str = Field(description="what failed, as the router saw it")
    error_type: str = Field(max_length=128, description="the exception's class")
    failures: int = Field(default=1, description="times routing this event failed")
    status: str = Field(max_length=16, description="open | replayed")


class DeadLetter(DeadLetterBase, table=True):
    """An event the router could not route, set aside so that every other event flows.

    Its event is out of the outbox (`routed_at` set) until it is replayed, which puts it back
    (`routed_at` null) and marks this row `replayed`; failing again reopens it."""

    __tablename__ = "dead_letters"
    __table_args__ = (sa.Index("ix_dead_letters_status", "status", "id"),)
    id: int | None = Field(
        default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True)
    )
    created_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()
    replayed_at: datetime | None = _ts(nullable=True, default=False)


class DeadLetterPublic(DeadLetterBase):
    id: int
    type: str
    event: str | None
    user_id: str | None
    anonymous_id: str | None
    timestamp: str = Field(description="as stored, e.g. `infinity` for an unusable one")
    payload: Any = Field(description="the envelope as stored (whatever made it unroutable)")
    created_at: datetime
    updated_at: datetime
    replayed_at: datetime | None


class DeadLetterPage(SQLModel):
    items: list[DeadLetterPublic]
    next_before: int | None = Field(description="pass as `before` for the next page")


class Message(SQLModel, table=True):
    """The send log: one row per send, reserved under its idempotency key before any effect."""

    __tablename__ = "messages"
    __table_args__ = (
        sa.Index("ix_messages_customer_created", "customer_id", "created_at"),
        sa.Index("ix_messages_provider_id", "channel", "provider_id"),
    )
    id: int | None = Field(
        default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True)
    )
    idempotency_key: str = Field(max_length=512, unique=True)
    customer_id: str = Field(max_length=64, index=True)
    journey_id: str | None = Field(default=None, max_length=64, index=True)
    journey_version: int | None = None
    step_id: str | None = Field(default=None, max_length=64)
    workflow_id: str | None = Field(default=None, max_length=256)
    channel: str = Field(max_length=32)
    subject: str | None = None
    body: str = ""
    html: str | None = None
    status: str = Field(
        max_length=32, description="pending | sending | sent | failed | skipped | bounced"
    )
    category: str = Field(
        default="marketing", max_length=16, sa_column_kwargs={"server_default": "marketing"}
    )
    skip_reason: str | None = Field(default=None, max_length=32)
    address: str | None = Field(default=None, max_length=512)
    # The provider's id for the message (SMTP Message-ID, SMS sid, push name): status callbacks
    # from the provider find the message by it.
    provider_id: str | None = Field(default=None, max_length=512)
    attempts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    error: str | None = None
    template_id: str | None = Field(default=None, max_length=64)
    template_version: int | None = None
    test: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    # URLs present in the rendered message: click redirects go only to these.
    links: list[str] = Field(
        default_factory=list,
        sa_column=sa.Column(JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    )
    created_at: datetime | None = _ts()
    claimed_at: datetime | None = _ts(nullable=True, default=False)
    sent_at: datetime | None = _ts(nullable=True, default=False)
    delivered_at: datetime | None = _ts(nullable=True, default=False)
    opened_at: datetime | None = _ts(nullable=True, default=False)
    clicked_at: datetime | None = _ts(nullable=True, default=False)
    read_at: datetime | None = _ts(nullable=True, default=False)


class Journey(SQLModel, table=True):
    __tablename__ = "journeys"
    id: str = Field(primary_key=True, max_length=64)
    name: str
    status: str = Field(max_length=16, description="draft | active | paused | archived")
    current_version: int
    draft: dict[str, Any] | None = Field(
        default=None, sa_column=sa.Column(JSONB, nullable=True), description="unpublished edit"
    )
    draft_updated_at: datetime | None = _ts(nullable=True, default=False)
    created_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()


class JourneyVersion(SQLModel, table=True):
    """Immutable published versions; runs pin the version they entered with."""

    __tablename__ = "journey_versions"
    journey_id: str = Field(primary_key=True, foreign_key="journeys.id", max_length=64)
    version: int = Field(primary_key=True)
    definition: dict[str, Any] = _json()
    checksum: str = Field(max_length=64)
    created_at: datetime | None = _ts()


class JourneyRun(SQLModel, table=True):
    """One row per enrollment, written before its run starts; the router signals the
    customer's `starting` / `running` ones."""

    __tablename__ = "journey_runs"
    __table_args__ = (
        sa.Index("ix_runs_customer_status", "customer_id", "status"),
        sa.Index("ix_runs_journey_customer", "journey_id", "customer_id"),
        # GET /v1/journeys/{id}/runs pages newest first (store.listing; migration 0013).
        sa.Index("ix_runs_journey_started", "journey_id", "started_at", "enrollment_id"),
        # One live run per workflow id, whoever enrolls (router, enroll API) and however fast.
        sa.Index(
            "ux_runs_live_workflow",
            "workflow_id",
            unique=True,
            postgresql_where=sa.text("status IN ('starting', 'running')"),
        ),
    )
    enrollment_id: str = Field(
        primary_key=True, max_length=1024, description="workflow id + entry event messageId"
    )
    run_id: str | None = Field(default=None, max_length=64)
    workflow_id: str = Field(max_length=256, index=True)
    journey_id: str = Field(max_length=64)
    journey_version: int
    customer_id: str = Field(max_length=64)
    # starting | running | completed | completed_with_failures | exited | failed | ended
    status: str = Field(max_length=32)
    exit_reason: str | None = None
    failures: int = Field(
        default=0,
        sa_column_kwargs={"server_default": sa.text("0")},
        description="sends of the run that failed (template error, provider refusal, bounce)",
    )
    started_at: datetime | None = _ts()
    ended_at: datetime | None = _ts(nullable=True, default=False)
    goal_at: datetime | None = _ts(nullable=True, default=False)
    run_key: str | None = Field(default=None, max_length=64)
    entry: dict[str, Any] | None = Field(
        default=None, sa_column=sa.Column(JSONB, nullable=True), description="the entry event"
    )
    arm: str | None = Field(default=None, max_length=64)
    holdout: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})


class EntrySkip(SQLModel, table=True):
    """An event that would have entered a journey but did not, and why (today: the journey was
    paused). Written by the router (`store.journeys.record_not_entered`), once per event and
    journey, so "nobody is dropped silently" holds for entries too."""

    __tablename__ = "entry_skips"
    __table_args__ = (
        sa.UniqueConstraint("journey_id", "message_id", name="ux_entry_skips_event"),
        sa.Index("ix_entry_skips_customer", "customer_id"),
    )
    id: int | None = Field(default=None, primary_key=True)
    journey_id: str = Field(max_length=64)
    journey_version: int
    customer_id: str = Field(max_length=64)
    message_id: str = Field(max_length=512)
    event: str | None = Field(default=None, max_length=512)
    reason: str = Field(max_length=32)
    created_at: datetime | None = _ts()


class AppliedEffect(SQLModel, table=True):
    """Idempotency keys of effects already applied (profile updates), so retries apply once."""

    __tablename__ = "applied_effects"
    idempotency_key: str = Field(primary_key=True, max_length=512)
    created_at: datetime | None = _ts()


class Task(SQLModel, table=True):
    """A hand-off to a human; closing it may resume the run that waits for it."""

    __tablename__ = "tasks"
    __table_args__ = (sa.Index("ix_tasks_status_queue", "status", "queue"),)
    id: int | None = Field(
        default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=True)
    )
    idempotency_key: str = Field(max_length=512, unique=True)
    customer_id: str = Field(max_length=64, index=True)
    journey_id: str = Field(max_length=64)
    step_id: str = Field(max_length=64)
    workflow_id: str = Field(max_length=256)
    enrollment_id: str = Field(max_length=1024)
    queue: str = Field(max_length=64)
    title: str
    details: dict[str, Any] = _json()
    status: str = Field(max_length=16, description="open | closed")
    outcome: str | None = None
    closed_by: str | None = Field(default=None, max_length=256)
    created_at: datetime | None = _ts()
    closed_at: datetime | None = _ts(nullable=True, default=False)


class Launch(SQLModel, table=True):
    """An audience launch: enrol every customer matching a condition, at a rate."""

    __tablename__ = "launches"
    id: str = Field(primary_key=True, max_length=64)
    journey_id: str = Field(max_length=64, index=True)
    audience: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(JSONB, nullable=True))
    rate_per_second: float
    page_size: int
    status: str = Field(max_length=16, description="running | completed | cancelled | failed")
    error: str | None = Field(default=None, description="why the launch failed")
    enrolled: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    skipped: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    cursor: str | None = Field(default=None, max_length=64)
    schedule_id: str | None = Field(default=None, max_length=128)
    created_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()
    finished_at: datetime | None = _ts(nullable=True, default=False)


class Subscription(SQLModel, table=True):
    """Consent per customer, channel and topic; absent means the configured default."""

    __tablename__ = "subscriptions"
    customer_id: str = Field(primary_key=True, max_length=64)
    channel: str = Field(primary_key=True, max_length=32)
    topic: str = Field(primary_key=True, max_length=64)
    status: str = Field(max_length=16, description="subscribed | unsubscribed")
    source: str | None = Field(default=None, max_length=64)
    updated_at: datetime | None = _ts()


class Suppression(SQLModel, table=True):
    """Addresses never to send to (hard bounce, complaint, manual)."""

    __tablename__ = "suppressions"
    channel: str = Field(primary_key=True, max_length=32)
    address: str = Field(primary_key=True, max_length=512)
    reason: str = Field(max_length=32)
    created_at: datetime | None = _ts()


class MessageTemplate(SQLModel, table=True):
    """A stored template for one channel; its content lives in numbered versions."""

    __tablename__ = "templates"
    id: str = Field(primary_key=True, max_length=64)
    name: str
    channel: str = Field(max_length=32)
    current_version: int
    created_at: datetime | None = _ts()
    updated_at: datetime | None = _ts()


class MessageTemplateVersion(SQLModel, table=True):
    """Versions never change once written: a journey pins the version it was published with."""

    __tablename__ = "template_versions"
    template_id: str = Field(primary_key=True, max_length=64, foreign_key="templates.id")
    version: int = Field(primary_key=True)
    subject: str | None = None
    body: str
    html: str | None = None
    created_at: datetime | None = _ts()


class SendRateWindow(SQLModel, table=True):
    """Sends per channel per time window, shared by all workers (CHANNEL_RATE_LIMITS)."""

    __tablename__ = "send_rate_windows"
    channel: str = Field(primary_key=True, max_length=32)
    window_start: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), primary_key=True)
    )
    sent: int


class ApiKey(SQLModel, table=True):
    """An API key: only the SHA-256 of its token is kept; the token is shown once, at creation.
    Revoked keys stay (the audit log names them)."""

    __tablename__ = "api_keys"
    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=200)
    scopes: list[str] = Field(sa_column=sa.Column(ARRAY(sa.String()), nullable=False))
    secret_hash: str = Field(max_length=64)
    created_by: str = Field(max_length=64)
    created_at: datetime | None = _ts()
    revoked_at: datetime | None = _ts(nullable=True, default=False)
    revoked_by: str | None = Field(default=None, max_length=64)


class AuditEntry(SQLModel, table=True):
    """Append-only record of management actions; a trigger refuses UPDATE and DELETE."""

    __tablename__ = "audit_log"
    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, primary_key=True))
    at: datetime | None = _ts()
    key_id: str = Field(max_length=64, index=True)
    action: str = Field(max_length=200, index=True)
    target: dict[str, Any] = _json()
    status: int | None = None
    before_version: int | None = None
    after_version: int | None = None
    detail: dict[str, Any] = _json()


class Erasure(SQLModel, table=True):
    """A customer's erasure (right to be forgotten): the durable record of who asked, when and
    how far it got. While it runs it knows the customer's ids; once done it keeps only hashes
    (`customer_hash`, `ref_hashes`), so a repeated request is recognised without the data."""

    __tablename__ = "erasures"
    __table_args__ = (
        # One erasure in flight per customer: a second DELETE joins it.
        sa.Index(
            "ux_erasures_running_customer",
            "customer_id",
            unique=True,
            postgresql_where=sa.text("status = 'running'"),
        ),
        sa.Index("ix_erasures_ref_hashes", "ref_hashes", postgresql_using="gin"),
    )
    id: str = Field(primary_key=True, max_length=64)
    mode: str = Field(max_length=32, description="erase | suppress | suppress_and_erase")
    status: str = Field(max_length=16, description="running | completed")
    customer_hash: str = Field(max_length=64, description="sha256 of the customer id")
    # Cleared when the erasure completes.
    customer_id: str | None = Field(default=None, max_length=64)
    customer_ids: list[str] | None = Field(
        default=None, sa_column=sa.Column(sa.ARRAY(sa.String()), nullable=True)
    )
    workflow_ids: list[str] | None = Field(
        default=None, sa_column=sa.Column(sa.ARRAY(sa.String()), nullable=True)
    )
    ref_hashes: list[str] = Field(
        default_factory=list,
        sa_column=sa.Column(
            sa.ARRAY(sa.String()), nullable=False, server_default=sa.text("'{}'::varchar[]")
        ),
    )
    requested_by: str = Field(max_length=256)
    source: str = Field(max_length=32, description="api | regulation")
    counts: dict[str, Any] = _json()
    requested_at: datetime | None = _ts()
    completed_at: datetime | None = _ts(nullable=True, default=False)
