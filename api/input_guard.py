"""Refuse input no route can store, before any route sees it: one mechanism for every route.

PostgreSQL text and jsonb cannot hold NUL; UTF-8 cannot encode a lone surrogate; jsonb has no
NaN or Infinity; deep nesting overflows encoders. Any of them in a path, a query parameter or
a JSON (or form) body would surface as a 500 deep in a route. This ASGI middleware answers
400 `{"code", "message"}` naming the field instead, and hands the body it read on unchanged.

The event API parses its own bodies (gzip, per-event limits, `invalid_event` errors naming
`batch[3]....`) with the same checks (`models.safe_json`), so its paths are listed in
`own_body_paths` and only their path and query are checked here.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.safe_json import UnsafeJson, find_unsafe, loads

MAX_BODY_BYTES = 1024 * 1024  # the largest body any route takes (provider callbacks)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class InputGuard:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: ASGIApp, *, own_body_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.own_body_paths = frozenset(own_body_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            path = get_route_path(scope)
            find_unsafe(path, "path")
            query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            find_unsafe(dict(query), "query")
            if (
                scope["method"] in _BODY_METHODS
                and get_route_path(scope) not in self.own_body_paths
            ):
                body = await _checked_body(scope, receive)
                if body is not None:
                    receive = _replay(body, receive)
        except UnsafeJson as err:
            await _refuse("invalid_request", str(err))(scope, receive, send)
            return
        except _Refused as err:
            await _refuse(err.code, err.message)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refuse(code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=400)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1").lower()
    return ""


async def _checked_body(scope: Scope, receive: Receive) -> bytes | None:
    """The body, read and checked, when it is JSON (or no type: FastAPI then reads JSON) or
    a form; None when it is another kind the route reads itself (left unread)."""
    kind = _header(scope, b"content-type").split(";")[0].strip()
    is_json = kind == "" or kind == "application/json" or kind.endswith("+json")
    is_form = kind == "application/x-www-form-urlencoded"
    encoding = _header(scope, b"content-encoding")
    if encoding not in ("", "identity"):
        # FastAPI would parse the raw bytes regardless of the header: a body we cannot read as
        # it is must not reach a route unchecked (only the event API inflates gzip).
        raise _Refused(
            "unsupported_encoding", f"Content-Encoding: {encoding!r} is not accepted here"
        )
    if not (is_json or is_form):
        return None
    declared = _header(scope, b"content-length")
    if declared and not (declared.isascii() and declared.isdigit()):
        raise _Refused("invalid_request", "Content-Length: not a number")
    if declared and int(declared) > MAX_BODY_BYTES:  # refused unread, on the header alone
        raise _Refused("too_large", f"body: exceeds {MAX_BODY_BYTES // 1024} KB")
    body = bytearray()
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > MAX_BODY_BYTES:
            raise _Refused("too_large", f"body: exceeds {MAX_BODY_BYTES // 1024} KB")
    if not body.strip():
        return bytes(body)
    if is_form:
        try:
            fields = parse_qsl(body.decode(), keep_blank_values=True)
        except UnicodeDecodeError:
            raise _Refused("invalid_request", "body: not form-encoded UTF-8") from None
        find_unsafe(dict(fields), "")
        return bytes(body)
    try:
        value = loads(bytes(body))
    except ValueError as err:
        raise _Refused("invalid_json", f"body: invalid JSON: {err}") from None
    find_unsafe(value, "")
    return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the body already read, then waits on the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
