"""One JSON error shape for every failure: {"code": ..., "message": ...}."""

from __future__ import annotations

from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from core.logs import get_logger
from models.definition_errors import explain

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


def request_problems(err: RequestValidationError) -> str:
    """FastAPI's validation errors said as every definition error is
    (`models.definition_errors`): the field, one message per mistake, no pydantic internals."""
    errors = [dict(e) for e in err.errors()]
    body = [{**e, "loc": tuple(e["loc"][1:])} for e in errors if e["loc"][:1] == ("body",)]
    rest = [e for e in errors if e["loc"][:1] != ("body",)]
    problems = explain(body, err.body if isinstance(err.body, dict | list) else {})
    for e in rest:  # path, query, header: a mapping of what was given, for the walk
        given: dict[str, Any] = {}
        node = given
        for part in e["loc"][:-1]:
            node = node.setdefault(part, {})
        if e["type"] != "missing":
            node[e["loc"][-1]] = e.get("input")
        problems += explain([e], given)
    return "; ".join(str(p) for p in problems)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, err: ApiError) -> JSONResponse:
        return _body(err.status, err.code, err.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        return _body(400, "invalid_request", request_problems(err))

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
