"""Contact policy, decided at every send inside the send's own transaction: consent per channel
and topic, an address on the channel, the suppression list, and frequency caps across all
journeys. A per-customer advisory lock serialises decisions, so two journeys racing for the
last slot of a cap cannot both win; caps count messages in the database, never in memory.
Transactional messages skip consent and caps (not suppression, not a channel-wide opt-out),
and the marketing opt-out an erased customer's address keeps."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from models.durations import parse_duration
from store.feedback import MARKETING_OPT_OUT, suppression_reasons
from store.profiles import lock_contact

# Where each channel's address lives on the profile.
ADDRESS_TRAIT = {"email": "email", "sms": "phone", "push": "push_token"}


@dataclass(frozen=True)
class Cap:
    limit: int
    window: timedelta
    channel: str | None = None  # None: across channels
    journey_id: str | None = None  # None: across journeys

    @classmethod
    def parse(cls, text: str, **scope: Any) -> Cap:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\S+)\s*", text)
        if not m:
            raise ValueError(f"invalid frequency cap {text!r}: use N/window, e.g. 3/7d")
        return cls(int(m.group(1)), parse_duration(m.group(2)), **scope)


def parse_caps(overall: str, per_channel: str) -> list[Cap]:
    caps = [Cap.parse(overall)] if overall.strip() else []
    for item in filter(None, (p.strip() for p in per_channel.split(","))):
        channel, _, cap = item.partition("=")
        caps.append(Cap.parse(cap, channel=channel.strip()))
    return caps


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str | None = None  # no_address | no_consent | suppressed | capped
    address: str | None = None


class ContactPolicy:
    def __init__(self, caps: list[Cap], *, consent_default: str = "subscribed") -> None:
        self.caps = caps
        self.consent_default = consent_default

    async def lock(self, conn: asyncpg.Connection, customer_id: str) -> None:
        """The per-customer lock a merge and an erasure take too (`store.profiles.lock_contact`):
        a send reads the customer again under it (activities.journey_activities)."""
        await lock_contact(conn, customer_id)

    async def decide(
        self,
        conn: asyncpg.Connection,
        *,
        customer_id: str,
        traits: dict[str, Any],
        channel: str,
        category: str,
        topic: str,
        journey_id: str | None,
        journey_cap: str | None = None,
    ) -> Decision:
        """Call with `lock` held in the same transaction as the reservation."""
        address: str | None = None
        if channel in ADDRESS_TRAIT:
            value = traits.get(ADDRESS_TRAIT[channel])
            if not isinstance(value, str) or not value.strip():
                return Decision(False, "no_address")
            address = value.strip().lower() if channel == "email" else value.strip()
        refusal = await self.refusal(
            conn,
            customer_id=customer_id,
            channel=channel,
            category=category,
            topic=topic,
            address=address,
        )
        if refusal is not None:
            return Decision(False, refusal, address)
        if category == "transactional":
            return Decision(True, None, address)
        caps = list(self.caps)
        if journey_cap:
            caps.append(Cap.parse(journey_cap, journey_id=journey_id))
        for cap in caps:
            used = await conn.fetchval(
                # Sent counts even if it bounced later (a complaint must not free a slot).
                "SELECT count(*) FROM messages WHERE customer_id = $1 AND category = 'marketing' "
                "AND NOT test AND (status IN ('pending', 'sending', 'sent') "
                "OR sent_at IS NOT NULL) "
                "AND created_at > now() - $2::interval "
                "AND ($3::text IS NULL OR channel = $3) AND ($4::text IS NULL OR journey_id = $4)",
                customer_id,
                cap.window,
                cap.channel,
                cap.journey_id,
            )
            if used >= cap.limit:
                return Decision(False, "capped", address)
        return Decision(True, None, address)

    async def refusal(
        self,
        conn: asyncpg.Connection,
        *,
        customer_id: str,
        channel: str,
        category: str,
        topic: str,
        address: str | None,
    ) -> str | None:
        """Suppression and consent (not caps): checked when a send is reserved, and again
        right before it goes out, since a retried send may wait for hours."""
        # Plain, or hashed: an erased customer's suppressed address stays blocked, and their
        # topic opt-out stays a marketing opt-out of the address (store.erasure).
        blocked = await suppression_reasons(conn, channel, address) if address else set()
        if blocked - {MARKETING_OPT_OUT}:
            return "suppressed"
        rows = await conn.fetch(
            "SELECT topic, status FROM subscriptions WHERE customer_id = $1 AND channel = $2 "
            "AND topic IN ($3, '*')",
            customer_id,
            channel,
            topic,
        )
        said = {r["topic"]: r["status"] for r in rows}
        # Topic '*' is the whole channel (an SMS STOP): it blocks every topic, and
        # transactional messages too (the carrier would refuse them anyway).
        if said.get("*") == "unsubscribed":
            return "no_consent"
        if category == "transactional":
            return None
        # A kept marketing opt-out stands in for the default; a choice this profile made
        # (after the erasure, so newer) wins over it.
        status = said.get(topic) or said.get("*")
        if status is None:
            status = "unsubscribed" if blocked else self.consent_default
        return None if status == "subscribed" else "no_consent"
