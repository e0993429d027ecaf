"""Payloads of privacy requests: the erasure workflow's input and results, the API's answers
(erasure status, Segment-style regulations) and the customer export.

The workflow's payloads carry the erasure id only, never a customer id or address: Temporal
keeps workflow histories, and the erasure's own history must not hold what it erases.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from models.public import CustomerPublic, IdentityPublic, JourneyRunPublic

ErasureMode = Literal["erase", "suppress", "suppress_and_erase"]
ErasureStatus = Literal["running", "completed"]


class ErasureInput(BaseModel):
    """The erasure workflow's input: the record to carry out (its row holds the ids)."""

    erasure_id: str


class RunsEnded(BaseModel):
    """What ending the customer's journey runs took."""

    found: int = 0
    exited: int = Field(default=0, description="ended by the run itself (steer exit)")
    terminated: int = 0


class DataErased(BaseModel):
    """Rows deleted per table, and the hashed suppressions kept."""

    counts: dict[str, int] = Field(default_factory=dict)
    suppressed: int = 0


class ExecutionsDeleted(BaseModel):
    deleted: int = 0


class ErasureOutcome(BaseModel):
    """The workflow's result (and what `GET /v1/erasures/{id}` shows as `counts`)."""

    runs: RunsEnded = Field(default_factory=RunsEnded)
    data: DataErased = Field(default_factory=DataErased)
    executions: ExecutionsDeleted = Field(default_factory=ExecutionsDeleted)


class FinishErasure(BaseModel):
    erasure_id: str
    outcome: ErasureOutcome


class ErasurePublic(BaseModel):
    """An erasure as the API shows it: no customer data, only the id's hash."""

    id: str
    status: ErasureStatus
    mode: ErasureMode
    customer_hash: str = Field(description="sha256 of the erased customer id")
    requested_by: str
    source: str
    requested_at: datetime
    completed_at: datetime | None
    counts: dict[str, Any] = Field(default_factory=dict)


class RegulationRequest(BaseModel):
    """Segment's `POST /regulations` (Public API), mapped onto erasures."""

    regulation_type: Literal["DELETE", "SUPPRESS", "SUPPRESS_WITH_DELETE"] = Field(
        alias="regulationType"
    )
    subject_type: Literal["USER_ID"] = Field(alias="subjectType")
    subject_ids: list[str] = Field(alias="subjectIds", min_length=1, max_length=100)

    @field_validator("regulation_type", "subject_type", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        # Segment spells it USER_ID; `userId` (the field's name) is accepted too.
        if isinstance(value, str):
            return value.strip().upper().replace("USERID", "USER_ID")
        return value


class RegulationPublic(BaseModel):
    regulate_id: str = Field(serialization_alias="regulateId")
    erasures: list[ErasurePublic]
    unknown_subjects: list[str] = Field(default_factory=list, serialization_alias="unknownSubjects")


class CustomerExport(BaseModel):
    """Everything held about one customer (data subject access request)."""

    exported_at: datetime
    customer: CustomerPublic
    merged_ids: list[str] = Field(description="customer ids merged into this one")
    identities: list[IdentityPublic]
    events: list[dict[str, Any]]
    messages: list[dict[str, Any]]
    inbox: list[dict[str, Any]]
    runs: list[JourneyRunPublic]
    tasks: list[dict[str, Any]]
    consent: list[dict[str, Any]]
    suppressions: list[dict[str, Any]]
