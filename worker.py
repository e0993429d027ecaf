"""The worker process: journey workflows, their activities, and the outbox router.

Production entry point: `python worker.py` with DATABASE_URL and TEMPORAL_ADDRESS set.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

from activities.channels import Channel, build_channels
from activities.contact_policy import ContactPolicy, parse_caps
from activities.erasure_activities import ErasureActivities
from activities.journey_activities import JourneyActivities
from activities.launch_activities import LaunchActivities
from activities.rate_limits import RateLimits, parse_rates
from activities.router import EventRouter
from core.logs import configure_logging, get_logger
from core.settings import Settings, get_settings
from core.temporal import connect
from store.db import create_pool
from workflows.erase import ErasureWorkflow
from workflows.journey import JourneyWorkflow
from workflows.launch import LaunchWorkflow

log = get_logger("worker")


def build_worker(
    client: Client,
    pool: asyncpg.Pool,
    task_queue: str,
    *,
    history_limit: int = 2000,
    policy: ContactPolicy | None = None,
    channels: dict[str, Channel] | None = None,
    links: tuple[str, str] | None = None,
    rates: RateLimits | None = None,
    signing_secret: str | None = None,
) -> Worker:
    # Ids travel as structured fields (see core.logs), not appended to the message text.
    workflow.logger.workflow_info_on_message = False
    activity.logger.activity_info_on_message = False
    launches = LaunchActivities(pool, client, task_queue=task_queue, history_limit=history_limit)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[JourneyWorkflow, LaunchWorkflow, ErasureWorkflow],
        activities=[
            *JourneyActivities(
                pool,
                policy=policy,
                channels=channels,
                links=links,
                rates=rates,
                signing_secret=signing_secret,
            ).all(),
            *launches.all(),
            *ErasureActivities(pool, client).all(),
        ],
        max_concurrent_activities=200,
    )


@asynccontextmanager
async def running_worker(
    client: Client, pool: asyncpg.Pool, settings: Settings
) -> AsyncIterator[EventRouter]:
    """Worker + router running together until the context exits."""
    router = EventRouter(
        pool,
        client,
        task_queue=settings.temporal_task_queue,
        batch_size=settings.router_batch_size,
        history_limit=settings.journey_history_limit,
    )
    stop = asyncio.Event()
    policy = ContactPolicy(
        parse_caps(settings.frequency_cap, settings.channel_frequency_caps),
        consent_default=settings.consent_default,
    )
    async with build_worker(
        client,
        pool,
        settings.temporal_task_queue,
        history_limit=settings.journey_history_limit,
        policy=policy,
        channels=build_channels(settings),
        links=(settings.public_url, settings.link_secret),
        rates=RateLimits(parse_rates(settings.channel_rate_limits)),
        signing_secret=settings.webhook_signing_secret,
    ):
        task = asyncio.create_task(router.run(stop))
        try:
            yield router
        finally:
            stop.set()
            await task


async def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    if not settings.database_url or not settings.temporal_address:
        raise SystemExit("worker.py needs DATABASE_URL and TEMPORAL_ADDRESS (or use `make dev`)")
    pool = await create_pool(settings.database_url, max_size=20)
    client = await connect(settings.temporal_address, settings.temporal_namespace)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_worker(client, pool, settings):
        log.info("worker.started", task_queue=settings.temporal_task_queue)
        await stop.wait()
    await pool.close()
    log.info("worker.stopped")


if __name__ == "__main__":
    asyncio.run(main())
