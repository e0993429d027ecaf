"""`channel: best`: order the channels by how the customer engages with each.

The heuristic counts the customer's messages on each channel that were opened, clicked or read
in the last 180 days (ties keep the default order). A model can replace it behind the same
`ChannelRanker` interface.
"""

from __future__ import annotations

from typing import Protocol

import asyncpg

DEFAULT_ORDER = ("email", "push", "sms", "in_app", "webhook", "outbox")


class ChannelRanker(Protocol):
    async def rank(
        self, conn: asyncpg.Connection, customer_id: str, channels: list[str]
    ) -> list[str]: ...


class EngagementRanker:
    async def rank(
        self, conn: asyncpg.Connection, customer_id: str, channels: list[str]
    ) -> list[str]:
        rows = await conn.fetch(
            "SELECT channel, count(*) AS n FROM messages WHERE customer_id = $1 "
            "AND NOT test AND created_at > now() - interval '180 days' "
            "AND (opened_at IS NOT NULL OR clicked_at IS NOT NULL OR read_at IS NOT NULL) "
            "GROUP BY channel",
            customer_id,
        )
        engaged = {r["channel"]: r["n"] for r in rows}
        order = {ch: i for i, ch in enumerate(DEFAULT_ORDER)}
        return sorted(channels, key=lambda ch: (-engaged.get(ch, 0), order.get(ch, 99)))
