"""FastAPI app. Production: `uvicorn api.main:app` with DATABASE_URL and TEMPORAL_ADDRESS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from activities.channels import build_channels
from api import errors
from api.deps import PoolDep, require_admin
from api.input_guard import InputGuard
from api.routes import (
    contact,
    customers,
    events,
    inbox,
    journeys,
    launches,
    privacy,
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
from models.segment import CALL_MODELS, BatchCall
from store.db import create_pool

ROUTES = (
    events,
    customers,
    journeys,
    tasks,
    launches,
    contact,
    unsubscribe,
    templates,
    tracking,
    providers,
    inbox,
    reports,
    privacy,
)


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
    app.add_middleware(InputGuard, own_body_paths=events.RAW_BODY_PATHS)
    for module in ROUTES:
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    @app.get("/health", tags=["health"])
    async def health(pool: PoolDep) -> dict[str, str]:
        await pool.fetchval("SELECT 1")
        return {"status": "ok"}

    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus what it cannot see: the Segment call bodies (the event routes read
    raw bodies) and the two kinds of auth, so clients and fuzzers can make valid requests."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {})
    _, defs = models_json_schema(
        [(m, "validation") for m in (*CALL_MODELS.values(), BatchCall)],
        ref_template="#/components/schemas/{model}",
    )
    components.setdefault("schemas", {}).update(defs["$defs"])
    components["securitySchemes"] = {
        WRITE_KEY: {
            "type": "http",
            "scheme": "basic",
            "description": "the write key as user name, empty password (or `writeKey` in the body)",
        },
        ADMIN_KEY: {"type": "http", "scheme": "bearer", "description": "JOURNEYS_ADMIN_KEY"},
    }
    for route in (r for module in ROUTES for r in module.router.routes):
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        needs = (
            WRITE_KEY
            if route.path in events.RAW_BODY_PATHS
            else ADMIN_KEY
            if any(d.call is require_admin for d in route.dependant.dependencies)
            else None
        )
        for method in route.methods if needs else ():
            schema["paths"][route.path_format][method.lower()]["security"] = [{needs: []}]
    app.openapi_schema = schema
    return schema


WRITE_KEY = "writeKey"
ADMIN_KEY = "adminKey"


app = create_app()
