"""Per-provider send rates, e.g. "email=50,sms=10" (messages per second, across all workers).

Provider limits are per account, so the count is kept in Postgres, not in a worker: one row
per channel and time window, incremented by every send that wants to go out. Over the rate,
the send activity does not wait inside the provider call: it fails with `next_retry_delay` set
to the end of the window, so Temporal retries it then — the workflow backs off durably and
nothing is lost or sent twice (the key is the same on every attempt).
"""

from __future__ import annotations

import math
import random

import asyncpg

_HIT = """
INSERT INTO send_rate_windows AS w (channel, window_start, sent)
VALUES ($1, to_timestamp(floor(extract(epoch FROM clock_timestamp()) / $2) * $2), 1)
ON CONFLICT (channel, window_start) DO UPDATE SET sent = w.sent + 1
RETURNING sent, $2 - extract(epoch FROM clock_timestamp() - window_start)::float8 AS left_s
"""


def parse_rates(spec: str) -> dict[str, float]:
    rates: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        channel, _, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(
                f"CHANNEL_RATE_LIMITS: {item!r} is not channel=messages_per_second"
            ) from None
        if rate <= 0:
            raise ValueError(f"CHANNEL_RATE_LIMITS: {item!r} must be positive")
        rates[channel.strip()] = rate
    return rates


class RateLimits:
    def __init__(self, rates: dict[str, float]) -> None:
        # (window seconds, messages per window): 0.2/s is one message per 5-second window.
        self.windows = {
            ch: (1, int(r)) if r >= 1 else (math.ceil(1 / r), 1) for ch, r in rates.items()
        }
        self._hits = 0

    async def wait_for(self, pool: asyncpg.Pool, channel: str) -> float | None:
        """Take a slot now (None) or say how many seconds until the next window."""
        window = self.windows.get(channel)
        if window is None:
            return None
        seconds, limit = window
        row = await pool.fetchrow(_HIT, channel, seconds)
        self._hits += 1
        if self._hits % 1000 == 0:
            await pool.execute(
                "DELETE FROM send_rate_windows WHERE window_start < now() - interval '1 hour'"
            )
        if row["sent"] <= limit:
            return None
        # Spread the retries over the next window instead of all at its first instant.
        return max(row["left_s"], 0.01) + random.uniform(0, seconds)
