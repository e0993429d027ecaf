"""Scoring models behind one interface. `rfm` is a recency/frequency/monetary heuristic over the
customer's own `Order Completed` events; the ML issue adds xgboost models under new names."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg

from models.runtime import ScoreResult


class ScoringModel(Protocol):
    name: str

    async def score(self, pool: asyncpg.Pool, customer_id: str) -> ScoreResult: ...


def _band(value: float, edges: tuple[float, ...]) -> int:
    """1..len(edges)+1: how many edges `value` reaches."""
    return 1 + sum(value >= e for e in edges)


class RfmModel:
    """Quintile-like bands with fixed edges: R by days since last order (fewer is better),
    F by order count, M by revenue. Score = R + F + M in 3..15."""

    name = "rfm"

    async def score(self, pool: asyncpg.Pool, customer_id: str) -> ScoreResult:
        row = await pool.fetchrow(
            "SELECT count(*) AS orders, max(timestamp) AS last, "
            "coalesce(sum(coalesce((payload->'properties'->>'revenue')::numeric, "
            "(payload->'properties'->>'total')::numeric, 0)), 0) AS revenue "
            "FROM events WHERE customer_id = $1 AND type = 'track' AND event = 'Order Completed'",
            customer_id,
        )
        assert row is not None
        orders, revenue = int(row["orders"]), float(row["revenue"])
        days = (datetime.now(UTC) - row["last"]).days if row["last"] else None
        recency = 1 if days is None else 6 - _band(days, (7, 30, 90, 180))
        frequency = _band(orders, (1, 2, 4, 8)) if orders else 1
        monetary = _band(revenue, (1, 50, 200, 1000)) if revenue else 1
        details: dict[str, Any] = {
            "recency_days": days,
            "orders": orders,
            "revenue": revenue,
            "r": recency,
            "f": frequency,
            "m": monetary,
        }
        return ScoreResult(model=self.name, score=recency + frequency + monetary, details=details)


MODELS: dict[str, ScoringModel] = {m.name: m for m in (RfmModel(),)}
