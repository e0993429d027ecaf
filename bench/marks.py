"""Where a latency sample's time went: Temporal history event times + per-stage summaries."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from bench.stats import summary

_FIRST = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED: "wf_started",
    EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED: "wft_started",
    EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED: "wft_completed",
    EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED: "act_scheduled",
    EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED: "act_started",
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "act_completed",
}

# (stage, from mark, to mark); t0 is the client's clock just before its call.
OURS_STAGES = [
    ("api: POST -> event row (received_at)", "t0", "received"),
    ("router: event row -> enrollment txn (wake + pick up)", "received", "run_row"),
    ("router: enrollment txn -> run started (SQL + SWS)", "run_row", "wf_started"),
    ("temporal: run started -> workflow task started", "wf_started", "wft_started"),
    ("worker: workflow task (first, schedules send)", "wft_started", "wft_completed"),
    ("temporal: activity scheduled -> started", "wft_completed", "act_started"),
    ("activity: started -> message row inserted", "act_started", "msg_created"),
    ("activity: message row -> sent_at", "msg_created", "sent_at"),
    ("total: POST -> sent_at", "t0", "sent_at"),
    ("(router chunk: enrollment txn -> routed_at)", "run_row", "routed"),
]
RAW_STAGES = [
    ("client: SWS call -> run started", "t0", "wf_started"),
    ("temporal: run started -> workflow task started", "wf_started", "wft_started"),
    ("worker: workflow task (first, schedules activity)", "wft_started", "wft_completed"),
    ("temporal: activity scheduled -> started", "wft_completed", "act_started"),
    ("activity: started -> time recorded", "act_started", "t_activity"),
    ("total: SWS call -> activity", "t0", "t_activity"),
]


async def add_history_marks(client: Client, samples: list[dict[str, Any]], par: int = 8) -> int:
    """Put the first time of each history event kind of interest into each sample."""
    sem = asyncio.Semaphore(par)
    fetched = 0

    async def one(s: dict[str, Any]) -> None:
        nonlocal fetched
        if not s.get("workflow_id"):
            return
        async with sem:
            with contextlib.suppress(Exception):
                handle = client.get_workflow_handle(s["workflow_id"], run_id=s.get("run_id"))
                history = await asyncio.wait_for(handle.fetch_history(), 10)
                for ev in history.events:
                    name = _FIRST.get(ev.event_type)
                    if name and name not in s:
                        s[name] = ev.event_time.seconds + ev.event_time.nanos / 1e9
                fetched += 1

    await asyncio.gather(*(one(s) for s in samples))
    return fetched


def stages(samples: list[dict[str, Any]], spec: list[tuple[str, str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, a, b in spec:
        values = [
            (s[b] - s[a]) * 1000
            for s in samples
            if isinstance(s.get(a), float) and isinstance(s.get(b), float)
        ]
        out[name] = summary(values)
    return out
