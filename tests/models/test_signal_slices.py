from datetime import UTC, datetime

from activities.enrollment import SIGNAL_BYTES, SIGNAL_EVENTS, slices
from models.runtime import JourneyEvent


def _event(i: int, size: int) -> JourneyEvent:
    return JourneyEvent(
        message_id=f"m{i}", type="track", event="Viewed", properties={"blob": "x" * size},
        timestamp=datetime(2026, 1, 1, tzinfo=UTC), customer_id="c",
    )  # fmt: skip


def test_slices_keep_order_and_bound_count_and_size():
    small = [_event(i, 10) for i in range(450)]
    parts = slices(small)
    assert [len(p) for p in parts] == [SIGNAL_EVENTS, SIGNAL_EVENTS, 50]
    assert [e.message_id for p in parts for e in p] == [e.message_id for e in small]
    big = [_event(i, 30_000) for i in range(60)]
    parts = slices(big)
    assert all(sum(len(e.model_dump_json()) for e in p) <= SIGNAL_BYTES for p in parts)
    assert sum(len(p) for p in parts) == 60
    assert slices([]) == []
