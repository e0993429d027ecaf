"""When does a `wait` with `at` (local time of day) or `until` (a date value) end?"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from models.conditions import resolve
from models.durations import parse_duration
from models.journey import WEEKDAYS
from models.runtime import WaitResolution


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def next_local_time(
    now: datetime, at: str, zone: str | None, weekdays: list[str] | None
) -> datetime:
    """The next moment that is `at` o'clock in `zone` on an allowed weekday (strictly after now)."""
    tz = _zone(zone)
    hour, minute = (int(x) for x in at.split(":"))
    local = now.astimezone(tz)
    day = local.date()
    for _ in range(8):
        candidate = datetime.combine(day, time(hour, minute), tzinfo=tz)
        allowed = weekdays is None or WEEKDAYS[candidate.weekday()] in weekdays
        if candidate > local and allowed:
            return candidate.astimezone(now.tzinfo)
        day += timedelta(days=1)
    raise ValueError(f"no allowed weekday in {weekdays}")


def signed_duration(text: str | None) -> timedelta:
    if not text:
        return timedelta(0)
    sign = -1 if text.startswith("-") else 1
    return sign * parse_duration(re.sub(r"^[+-]", "", text))


def date_from(
    path: str, offset: str | None, entry: dict[str, Any] | None, traits: dict[str, Any]
) -> WaitResolution:
    value = resolve(path, {"entry": entry or {}, "profile": {"traits": traits}})
    if value in (None, ""):
        return WaitResolution(deadline=None, note=f"no value at {path}")
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return WaitResolution(deadline=None, note=f"not a date at {path}: {value!r}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=ZoneInfo("UTC"))
    try:
        return WaitResolution(deadline=when + signed_duration(offset))
    except OverflowError:
        return WaitResolution(deadline=None, note=f"date out of range at {path}: {value!r}")


def quiet_until(now: datetime, start: str, end: str, zone: str | None) -> datetime | None:
    """The end of the quiet window containing `now`, or None when `now` is outside it."""
    tz = _zone(zone)
    local = now.astimezone(tz)
    (sh, sm), (eh, em) = ((int(x) for x in t.split(":")) for t in (start, end))
    t, s, e = (local.hour, local.minute), (sh, sm), (eh, em)
    inside = s <= t < e if s < e else (t >= s or t < e)
    if not inside:
        return None
    day = local.date() if t < e else local.date() + timedelta(days=1)
    return datetime.combine(day, time(eh, em), tzinfo=tz).astimezone(now.tzinfo)
