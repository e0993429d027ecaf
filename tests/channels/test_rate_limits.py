"""CHANNEL_RATE_LIMITS are counted in Postgres, so two workers share one provider limit."""

from __future__ import annotations

import asyncio

import pytest

from activities.rate_limits import RateLimits, parse_rates


async def test_two_workers_share_one_limit(db):
    # One message per 10 minutes: every hit below lands in the same window.
    workers = [RateLimits({"sms": 1 / 600}), RateLimits({"sms": 1 / 600})]
    waits = await asyncio.gather(*(workers[i % 2].wait_for(db, "sms") for i in range(6)))
    assert sum(w is None for w in waits) == 1
    assert all(0 < w <= 1200 for w in waits if w is not None)
    assert await workers[0].wait_for(db, "email") is None  # no limit on that channel


def test_rates_become_windows():
    # (window seconds, messages per window)
    assert RateLimits({"push": 3, "sms": 0.2, "email": 2.5}).windows == {
        "push": (1, 3), "sms": (5, 1), "email": (1, 2),
    }  # fmt: skip


def test_rates_parse_and_bad_ones_name_the_item():
    assert parse_rates(" email=50, sms=0.5 ") == {"email": 50.0, "sms": 0.5}
    with pytest.raises(ValueError, match="'sms=fast'"):
        parse_rates("sms=fast")
    with pytest.raises(ValueError, match="positive"):
        parse_rates("sms=0")
