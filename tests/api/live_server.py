"""The API app under a real uvicorn server, in the test's event loop, on a free port: for
clients that speak HTTP with blocking `requests` (RudderStack's SDK, schemathesis), run in a
thread while the server serves."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn

from api.main import create_app
from core.settings import Settings
from tests.conftest import eventually


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def live_api(settings: Settings) -> AsyncIterator[str]:
    """Yields the base URL; the app's lifespan (pool, Temporal client) runs as in production."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())

    async def started() -> bool:
        if serving.done():
            serving.result()  # raises what stopped it
        return server.started

    try:
        await eventually(started, within=30, what="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving
