"""`worker.py` that SIGKILLs itself at one point of one customer's send, once.

CRASH_PLAN = "email-address-or-phone=point,..." with point one of
  before_provider  the send is claimed, the provider not yet called
  after_provider   the provider accepted the message, the outcome not yet recorded
  after_record     the outcome is recorded, the activity not yet completed
CRASH_DIR holds one marker per plan entry, so the restarted process (the same script) goes on
without crashing again on the retry. Used by tests/e2e/test_send_crashes.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import worker
from activities.channels import RenderedMessage
from activities.journey_activities import JourneyActivities

PLAN = dict(p.split("=", 1) for p in filter(None, os.environ["CRASH_PLAN"].split(",")))
MARKERS = Path(os.environ["CRASH_DIR"])


def crash_if(point: str, address: str | None) -> None:
    if address is None or PLAN.get(address) != point:
        return
    marker = MARKERS / address
    if marker.exists():
        return
    marker.write_text(point)
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(deliver: Any) -> Any:
    async def deliver_with_crashes(message: RenderedMessage) -> Any:
        crash_if("before_provider", message.to)
        delivery = await deliver(message)
        crash_if("after_provider", message.to)
        return delivery

    return deliver_with_crashes


_build = worker.build_channels


def build_channels(settings: Any, *args: Any, **kwargs: Any) -> Any:
    channels = _build(settings, *args, **kwargs)
    for channel in channels.values():
        channel.deliver = _wrap(channel.deliver)  # type: ignore[method-assign]
    return channels


_deliver = JourneyActivities._deliver


async def _deliver_with_crash(self: JourneyActivities, req: Any, row: Any, *args: Any) -> Any:
    result = await _deliver(self, req, row, *args)
    crash_if("after_record", row["address"])
    return result


worker.build_channels = build_channels  # type: ignore[assignment]
JourneyActivities._deliver = _deliver_with_crash  # type: ignore[method-assign]

if __name__ == "__main__":
    asyncio.run(worker.main())
