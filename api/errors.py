"""One JSON error shape for every failure: {"code": ..., "message": ...}."""

from __future__ import annotations

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from core.logs import get_logger

log = get_logger("api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _body(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at this path (routes may be nested routers)."""
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in app.router.routes
        )
    ]


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, err: ApiError) -> JSONResponse:
        return _body(err.status, err.code, err.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(x) for x in e['loc'] if x != 'body')}: {e['msg']}" for e in err.errors()
        ]
        return _body(400, "invalid_request", "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            err.status_code, "error"
        )
        headers = dict(err.headers or {})
        if err.status_code == 405:
            # Starlette names only the first route matching the path; a path served by
            # several routes (GET list, POST create) allows the methods of all of them.
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return _body(err.status_code, code, str(err.detail), **headers)

    async def _db_down(_: Request, err: Exception) -> JSONResponse:
        log.warning("api.db_unavailable", error=str(err))
        return _body(
            503, "unavailable", "storage is unavailable; retry later", **{"Retry-After": "1"}
        )

    # Nothing was stored: a 503 tells the client to retry (Segment clients do).
    for exc in (
        OSError,
        asyncpg.PostgresConnectionError,
        asyncpg.CannotConnectNowError,
        asyncpg.InterfaceError,
        asyncpg.exceptions.AdminShutdownError,
    ):
        app.add_exception_handler(exc, _db_down)
