"""Per-provider send rates (messages/s, per worker process), e.g. "email=50,sms=10".

Over the rate, the send activity does not wait inside the provider call: it fails with
`next_retry_delay` set to when the window frees up, so Temporal retries it then — the workflow
backs off durably and nothing is lost or sent twice (the key is the same on every attempt).
"""

from __future__ import annotations

import time

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


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
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        # Whole messages per second; a rate under 1/s becomes 1 per ceil(1/rate) seconds.
        self.items = {
            ch: RateLimitItemPerSecond(max(int(r), 1), 1 if r >= 1 else round(1 / r))
            for ch, r in rates.items()
        }

    def wait_for(self, channel: str) -> float | None:
        """Take a slot now (None) or say how many seconds until one frees up."""
        item = self.items.get(channel)
        if item is None or self.limiter.hit(item, channel):
            return None
        reset = self.limiter.get_window_stats(item, channel).reset_time
        return max(reset - time.time(), 0.05)
