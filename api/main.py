"""FastAPI app. Production: `uvicorn api.main:app` with DATABASE_URL and TEMPORAL_ADDRESS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from activities.channels import build_channels
from api import errors
from api.deps import PoolDep
from api.routes import (
    contact,
    customers,
    dead_letters,
    events,
    inbox,
    journeys,
    launches,
    providers,
    reports,
    tasks,
    templates,
    tracking,
    unsubscribe,
)
from core.logs import configure_logging
from core.settings import Settings, get_settings
from core.temporal import connect
from store.db import create_pool


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format, settings.log_level)
        if not settings.database_url or not settings.temporal_address:
            raise RuntimeError("the API needs DATABASE_URL and TEMPORAL_ADDRESS (or `make dev`)")
        app.state.settings = settings
        app.state.pool = await create_pool(settings.database_url, max_size=20)
        app.state.temporal = await connect(settings.temporal_address, settings.temporal_namespace)
        # Test sends go through the same providers as the worker's sends.
        async with httpx.AsyncClient(timeout=settings.provider_timeout) as http:
            app.state.channels = build_channels(settings, http)
            yield
            for channel in app.state.channels.values():
                if hasattr(channel, "aclose"):
                    await channel.aclose()
        await app.state.pool.close()

    app = FastAPI(
        title="Journeys",
        description="Customer journey orchestration on Temporal: Segment-style event API, "
        "customer read API, journey definitions.",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(events.router)
    app.include_router(customers.router)
    app.include_router(journeys.router)
    app.include_router(tasks.router)
    app.include_router(launches.router)
    app.include_router(contact.router)
    app.include_router(unsubscribe.router)
    app.include_router(templates.router)
    app.include_router(tracking.router)
    app.include_router(providers.router)
    app.include_router(inbox.router)
    app.include_router(reports.router)
    app.include_router(dead_letters.router)

    @app.get("/health", tags=["health"])
    async def health(pool: PoolDep) -> dict[str, str]:
        await pool.fetchval("SELECT 1")
        return {"status": "ok"}

    return app


app = create_app()
