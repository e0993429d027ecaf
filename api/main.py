"""FastAPI app. Production: `uvicorn api.main:app` with DATABASE_URL and TEMPORAL_ADDRESS."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import yaml
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from activities.channels import build_channels
from api import docs, errors, health
from api.access import AccessMiddleware, Keyring
from api.deps import PoolDep, TemporalDep
from api.input_guard import InputGuard
from api.routes import (
    audit,
    contact,
    customers,
    dead_letters,
    events,
    inbox,
    journeys,
    keys,
    launches,
    lists,
    privacy,
    providers,
    reports,
    tasks,
    templates,
    tracking,
    unsubscribe,
)
from api.scopes import ROUTE_SCOPES
from core.logs import configure_logging
from core.outbound import OutboundPolicy, outbound_client
from core.settings import ROOT, Settings, get_settings, require_secrets
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
    keys,
    audit,
    dead_letters,
    privacy,
    lists,
)
# The example of a journey definition in /docs: a real one, as shipped.
EXAMPLE_JOURNEY = ROOT / "journeys" / "welcome_series.yaml"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format, settings.log_level)
        require_secrets(settings, "the API")
        if not settings.database_url or not settings.temporal_address:
            raise RuntimeError("the API needs DATABASE_URL and TEMPORAL_ADDRESS (or `make dev`)")
        app.state.settings = settings
        app.state.pool = await create_pool(settings.database_url, max_size=20)
        app.state.keyring = Keyring(settings)
        await app.state.keyring.reload(app.state.pool)
        watcher = asyncio.create_task(
            app.state.keyring.watch(
                app.state.pool, settings.database_url, settings.api_keys_refresh_seconds
            )
        )
        app.state.temporal = await connect(settings.temporal_address, settings.temporal_namespace)
        # Test sends go through the same providers as the worker's sends.
        guarded = outbound_client(  # the webhook channel's URL (core.outbound)
            OutboundPolicy.from_settings(settings), timeout=settings.provider_timeout
        )
        async with httpx.AsyncClient(timeout=settings.provider_timeout) as http, guarded:
            app.state.channels = build_channels(settings, http, outbound=guarded)
            yield
            for channel in app.state.channels.values():
                if hasattr(channel, "aclose"):
                    await channel.aclose()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await app.state.pool.close()

    app = FastAPI(
        title="Journeys",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served from a package by api.docs, not from a CDN
        redoc_url=None,
    )
    errors.install(app)
    app.add_middleware(InputGuard, own_body_paths=events.RAW_BODY_PATHS)
    # Keys, scopes, body limits and the audit log for every route (outermost): api/scopes.py.
    app.add_middleware(AccessMiddleware)
    for module in ROUTES:
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    docs.install(app)

    @app.get(
        "/health",
        tags=["health"],
        response_model=health.Health,
        responses={503: {"model": health.Health, "description": "a check failed (see checks)"}},
    )
    async def health_check(pool: PoolDep, temporal: TemporalDep) -> JSONResponse:
        """PostgreSQL, Temporal, a worker polling the task queue, and router lag, each with
        its details; 503 when any fails (e.g. the worker is down: events would be stored but
        not routed). For load balancers use /health/live."""
        report = await health.check(
            pool, temporal, settings.temporal_namespace, settings.temporal_task_queue
        )
        status = 200 if report.status == "ok" else 503
        return JSONResponse(report.model_dump(mode="json"), status_code=status)

    @app.get("/health/live", tags=["health"])
    async def health_live() -> dict[str, str]:
        """The API process serves HTTP; checks nothing else (for load balancers)."""
        return {"status": "ok"}

    return app


DESCRIPTION = """Customer journey orchestration on Temporal: Segment-style event API, customer
read API, journey definitions.

**Try it here.** Press **Authorize** and give a key: `writeKey` (HTTP Basic: the write key as
user name, empty password) for the event routes (`/v1/track`, `/v1/batch`, ...), `adminKey`
(Bearer: `JOURNEYS_ADMIN_KEY` or a scoped key from `POST /v1/keys`) for everything else.
Then open a route, **Try it out**, **Execute**.

**Journey definitions.** `POST /v1/journeys`, `PUT /v1/journeys/{journey_id}/draft` and
`POST /v1/journeys/{journey_id}/validate` take a journey definition (JSON, or YAML converted);
its full JSON Schema is at [`GET /v1/journeys/schema`](/v1/journeys/schema), and the example
shown with those routes is `journeys/welcome_series.yaml`.

**Lists** are paged: `limit`, then the `next_cursor` of a page as `cursor` for the next one.
Errors are `{"code": ..., "message": ...}`, the message naming the field.
"""
# The routes whose body is a journey definition (their modules take `dict[str, Any]`).
DEFINITION_BODIES = (
    ("post", "/v1/journeys"),
    ("put", "/v1/journeys/{journey_id}/draft"),
    ("post", "/v1/journeys/{journey_id}/validate"),
)


def _example_definition() -> dict[str, Any] | None:
    """journeys/welcome_series.yaml, or None where the example journeys are not installed."""
    try:
        loaded = yaml.safe_load(EXAMPLE_JOURNEY.read_text())
    except OSError:
        return None
    return loaded if isinstance(loaded, dict) else None


def _document_definition_bodies(schema: dict[str, Any]) -> None:
    """A real journey as the example of the definition bodies, instead of the generic
    `{"additionalProp1": {}}` that Swagger UI makes up for a free-form object."""
    example = _example_definition()
    for method, path in DEFINITION_BODIES:
        operation = schema["paths"].get(path, {}).get(method)
        if operation is None or "requestBody" not in operation:
            continue
        operation["description"] = (
            operation.get("description", "")
            + "\n\nThe body is a journey definition: its JSON Schema is `GET /v1/journeys/schema`"
            " (example: `journeys/welcome_series.yaml`)."
        ).strip()
        for media in operation["requestBody"].get("content", {}).values():
            media.setdefault("schema", {})["description"] = (
                "a journey definition (JSON Schema: GET /v1/journeys/schema)"
            )
            if example is not None:
                media["example"] = example


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
        ADMIN_KEY: {
            "type": "http",
            "scheme": "bearer",
            "description": "JOURNEYS_ADMIN_KEY or a scoped key (POST /v1/keys)",
        },
    }
    for route in (r for module in ROUTES for r in module.router.routes):
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods:
            rule = ROUTE_SCOPES.get((method, route.path))
            if rule is None or rule.scope is None:
                continue
            needs = WRITE_KEY if rule.scope == "ingest" else ADMIN_KEY
            schema["paths"][route.path_format][method.lower()]["security"] = [{needs: []}]
    _document_definition_bodies(schema)
    app.openapi_schema = schema
    return schema


WRITE_KEY = "writeKey"
ADMIN_KEY = "adminKey"


app = create_app()
