"""The worker process: journey workflows, their activities, and the outbox router.

Production entry point: `python worker.py` with DATABASE_URL and TEMPORAL_ADDRESS set.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

from activities.channels import Channel, build_channels, close_channels
from activities.contact_policy import ContactPolicy, parse_caps
from activities.erasure_activities import ErasureActivities
from activities.journey_activities import JourneyActivities
from activities.launch_activities import LaunchActivities
from activities.rate_limits import RateLimits, parse_rates
from activities.router import EventRouter
from core.logs import configure_logging, get_logger
from core.outbound import OutboundPolicy, outbound_client
from core.settings import InsecureSecrets, Settings, get_settings, require_secrets
from core.temporal import connect
from store.db import create_pool
from workflows.erase import ErasureWorkflow
from workflows.journey import JourneyWorkflow
from workflows.launch import LaunchWorkflow

log = get_logger("worker")


class JourneyWorker(Worker):
    """A Worker that closes what its journey activities opened themselves (their HTTP client,
    when none was passed in) once it has shut down and no activity runs any more."""

    def __init__(self, *args: Any, journey_activities: JourneyActivities, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.journey_activities = journey_activities

    async def shutdown(self) -> None:
        try:
            await super().shutdown()
        finally:
            await self.journey_activities.aclose()


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
    http: httpx.AsyncClient | None = None,
    outbound: OutboundPolicy | None = None,
) -> JourneyWorker:
    """`http`: the client for webhook steps and hand-off notifications, a
    `core.outbound.outbound_client` (they call URLs journey authors wrote); the caller keeps
    ownership of it (and of `channels`). Without one the activities open their own with the
    `outbound` policy (default: from the settings), closed when the worker shuts down."""
    # Ids travel as structured fields (see core.logs), not appended to the message text.
    workflow.logger.workflow_info_on_message = False
    activity.logger.activity_info_on_message = False
    launches = LaunchActivities(pool, client, task_queue=task_queue, history_limit=history_limit)
    journeys = JourneyActivities(
        pool,
        http,
        policy=policy,
        channels=channels,
        links=links,
        rates=rates,
        signing_secret=signing_secret,
        outbound=outbound,
    )
    return JourneyWorker(
        client,
        task_queue=task_queue,
        workflows=[JourneyWorkflow, LaunchWorkflow, ErasureWorkflow],
        activities=[*journeys.all(), *launches.all(), *ErasureActivities(pool, client).all()],
        max_concurrent_activities=200,
        journey_activities=journeys,
    )


@dataclass(frozen=True)
class RunningWorker:
    router: EventRouter
    channels: dict[str, Channel]
    activities: JourneyActivities


@asynccontextmanager
async def running_worker(
    client: Client, pool: asyncpg.Pool, settings: Settings
) -> AsyncIterator[RunningWorker]:
    """Worker + router running together until the context exits. Owns the provider clients:
    one HTTP client for the operator's provider APIs (SMS, push), one guarded client for URLs
    that journeys and the webhook channel name (core.outbound), and the channels' SMTP
    connections, all closed after the worker has shut down."""
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
    async with AsyncExitStack() as owned:
        http = await owned.enter_async_context(httpx.AsyncClient(timeout=settings.provider_timeout))
        policy_out = OutboundPolicy.from_settings(settings)
        guarded = await owned.enter_async_context(
            outbound_client(policy_out, timeout=settings.provider_timeout)
        )
        channels = build_channels(settings, http, outbound=guarded)
        owned.push_async_callback(close_channels, channels)
        worker = await owned.enter_async_context(
            build_worker(
                client,
                pool,
                settings.temporal_task_queue,
                history_limit=settings.journey_history_limit,
                policy=policy,
                channels=channels,
                links=(settings.public_url, settings.link_secret),
                rates=RateLimits(parse_rates(settings.channel_rate_limits)),
                signing_secret=settings.webhook_signing_secret,
                http=guarded,
            )
        )
        task = asyncio.create_task(router.run(stop))
        try:
            yield RunningWorker(router, channels, worker.journey_activities)
        finally:
            stop.set()
            await task


async def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    try:
        require_secrets(settings, "the worker")
    except InsecureSecrets as err:
        raise SystemExit(str(err)) from None
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
