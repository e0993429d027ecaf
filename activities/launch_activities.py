"""Activities of audience launches: find a page of the audience and enrol it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
from pydantic import TypeAdapter
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from activities.enrollment import Start, enroll, load_history, mark_started, start_run
from models.audience import AudienceError, compile_audience
from models.conditions import Condition
from models.runtime import AudiencePage, JourneyEvent, LaunchProgress, PageResult
from store.journeys import active_definitions
from workflows.journey import workflow_id_for

_CONDITION = TypeAdapter(Condition)


class LaunchActivities:
    def __init__(
        self, pool: asyncpg.Pool, client: Client, *, task_queue: str, history_limit: int
    ) -> None:
        self.pool = pool
        self.client = client
        self.task_queue = task_queue
        self.history_limit = history_limit

    @activity.defn(name="enroll_audience_page")
    async def enroll_audience_page(self, page: AudiencePage) -> PageResult:
        journey = next(
            (d for d in await active_definitions(self.pool) if d.id == page.journey_id), None
        )
        if journey is None:
            raise ApplicationError(f"journey {page.journey_id!r} is not active", non_retryable=True)
        try:
            cond = _CONDITION.validate_python(page.audience) if page.audience else None
            where, params = compile_audience(cond)
        except (AudienceError, ValueError) as err:
            raise ApplicationError(f"audience: {err}", non_retryable=True) from err
        n = len(params)
        ids = [
            r["id"]
            for r in await self.pool.fetch(
                f"SELECT c.id FROM customers c WHERE {where} "
                f"AND (${n + 1}::text IS NULL OR c.id > ${n + 1}) ORDER BY c.id LIMIT ${n + 2}",
                *params,
                page.after,
                page.limit,
            )
        ]
        if not ids:
            return PageResult(enrolled=0, skipped=0, last=page.after, count=0)
        message_id = f"launch:{page.launch_id}"
        starts: list[Start] = []
        skipped = 0
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                histories = await load_history(conn, ids)
                done = {
                    r["customer_id"]
                    for r in await conn.fetch(
                        "SELECT customer_id FROM journey_runs WHERE enrollment_id = "
                        "ANY($1::text[])",
                        [f"{workflow_id_for(journey.id, c)}:{message_id}" for c in ids],
                    )
                }
                for cid in ids:
                    if cid in done:
                        continue  # enrolled by an earlier attempt of this page
                    entry = JourneyEvent(
                        message_id=message_id,
                        type="enroll",
                        event=journey.id,
                        properties={"launch_id": page.launch_id},
                        timestamp=datetime.now(UTC),
                        customer_id=cid,
                    )
                    start = await enroll(
                        conn, journey, cid, entry, [entry], histories[(cid, journey.id)]
                    )
                    if isinstance(start, Start):
                        starts.append(start)
                    else:
                        skipped += 1
            sem = asyncio.Semaphore(32)

            async def go(start: Start) -> None:
                async with sem:
                    await start_run(self.client, self.task_queue, self.history_limit, start)
                    activity.heartbeat()

            await asyncio.gather(*(go(s) for s in starts))
            await mark_started(conn, starts)
        return PageResult(
            enrolled=len(starts) + len(done), skipped=skipped, last=ids[-1], count=len(ids)
        )

    @activity.defn(name="record_launch")
    async def record_launch(self, p: LaunchProgress) -> None:
        await self.pool.execute(
            "INSERT INTO launches (id, journey_id, rate_per_second, page_size, status, enrolled, "
            "skipped, cursor, error) VALUES ($1, $2, 0, 0, $3, $4, $5, $6, $7) "
            "ON CONFLICT (id) DO UPDATE SET status = $3, enrolled = $4, skipped = $5, "
            "cursor = $6, error = $7, updated_at = now(), "
            "finished_at = CASE WHEN $3 <> 'running' THEN now() END",
            p.launch_id,
            p.journey_id,
            p.status,
            p.enrolled,
            p.skipped,
            p.cursor,
            p.error,
        )

    def all(self) -> list[object]:
        return [self.enroll_audience_page, self.record_launch]
