"""The one access mechanism: authenticate, authorize, limit the body, audit. App-wide.

`AccessMiddleware` finds the route a request is for (the app's own route table, FastAPI path
templates), looks up its rule in `api.scopes.ROUTE_SCOPES` and then, before the route runs:

- public routes pass (they carry their own token or signature);
- a key is read from `Authorization: Bearer <key>` or HTTP Basic `<key>:`; none or an unknown
  key is 401, a valid key without the route's scope is 403 (both `{code, message}`); event
  routes may instead carry `writeKey` in the body, which the route checks with the same keyring
  (`api.deps.check_write_key`);
- the body is read up to MAX_REQUEST_BYTES (413 `too_large` past it), except on routes that
  read and limit their own (events, provider callbacks);
- after the route answered, a non-GET request on a manage/operate/admin route is appended to
  the audit log (key id, `METHOD /path/{template}`, path parameters, status, and before/after
  versions of the journey or template it changed), and only then is the answer sent.

Keys come from `Keyring`: the two bootstrap keys of the environment plus the active keys of
`api_keys`, held in memory and reloaded whenever a key changes (NOTIFY) and periodically.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import asyncpg
from fastapi.routing import iter_route_contexts
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import compile_path, get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from activities.signing import same
from api.body import YAML_TYPES
from api.errors import ApiError
from api.scopes import ADMIN_KEY_SCOPES, AUDITED, WRITE_KEY_SCOPES, Rule, rule_for
from core.logs import get_logger
from core.settings import Settings, asyncpg_dsn
from models.definition_text import parse_yaml
from store import api_keys, audit

log = get_logger("api.access")

PRINCIPAL = "journeys.principal"
ADMIN_KEY_ID = "env:admin"
WRITE_KEY_ID = "env:write"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key id (never the secret) and what it may do."""

    key_id: str
    scopes: frozenset[str]


class Keyring:
    """Every key this API accepts, in memory: authentication costs no database round trip,
    and keeps working (with the last known keys) while the database is briefly away."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stored: dict[str, api_keys.StoredKey] = {}

    def authenticate(self, token: str) -> Principal | None:
        if not token:
            return None
        if same(self._settings.journeys_admin_key, token):
            return Principal(ADMIN_KEY_ID, ADMIN_KEY_SCOPES)
        if any(same(k, token) for k in self._settings.write_keys):
            return Principal(WRITE_KEY_ID, WRITE_KEY_SCOPES)
        key_id = api_keys.key_id_of(token)
        stored = self._stored.get(key_id) if key_id else None
        if stored is None or not api_keys.matches(stored, token):
            return None
        return Principal(stored.id, stored.scopes)

    async def reload(self, pool: asyncpg.Pool) -> None:
        self._stored = await api_keys.active_keys(pool)

    async def watch(self, pool: asyncpg.Pool, dsn: str, every: float) -> None:
        """Reload on every NOTIFY from `store.api_keys`, and at least every `every` seconds
        (a notification sent while the listening connection was down is not replayed)."""
        while True:
            conn: asyncpg.Connection | None = None
            changed = asyncio.Event()
            try:
                conn = await asyncpg.connect(asyncpg_dsn(dsn))
                await conn.add_listener(api_keys.CHANGED, lambda *_, ev=changed: ev.set())
                while not conn.is_closed():
                    await self.reload(pool)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), every)
                    changed.clear()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
                log.warning("api_keys.reload_failed", error=str(err))
                await asyncio.sleep(min(every, 1.0))
            finally:
                if conn is not None:
                    conn.terminate()


# The keyring of the app serving the current request, for checks that run inside a route
# (`writeKey` in an event body) and have no request at hand.
current_keyring: ContextVar[Keyring | None] = ContextVar("current_keyring", default=None)


def _answer(refused: ApiError) -> JSONResponse:
    # The middleware runs outside the app's exception handlers: it answers in their shape.
    body = {"code": refused.code, "message": refused.message}
    return JSONResponse(body, status_code=refused.status)


def credentials(headers: dict[str, str] | Any) -> str | None:
    """The key of `Authorization: Bearer <key>` or HTTP Basic `<key>:` (None: no header)."""
    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if not value:
        return None
    if scheme.lower() == "bearer":
        return value
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value, validate=True).decode().partition(":")[0]
        except (ValueError, UnicodeDecodeError):
            raise ApiError(401, "unauthorized", "malformed Basic authorization header") from None
    return None


def authorize(principal: Principal | None, scope: str, what: str) -> Principal:
    """401 for no or an unknown key, 403 for a known key without `scope`."""
    if principal is None:
        raise ApiError(
            401,
            "unauthorized",
            f"{what}: an API key with the `{scope}` scope is required "
            "(`Authorization: Bearer <key>`)",
        )
    if scope not in principal.scopes:
        raise ApiError(
            403,
            "forbidden",
            f"{what}: key {principal.key_id} lacks the `{scope}` scope "
            f"(it has: {', '.join(sorted(principal.scopes)) or 'none'})",
        )
    return principal


@dataclass(frozen=True)
class _Route:
    regex: re.Pattern[str]
    methods: frozenset[str]
    path: str


class AccessMiddleware:
    """See the module docstring. Installed once, in `api.main.create_app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: list[_Route] | None = None

    def _route_table(self, fastapi_app: Any) -> list[_Route]:
        # Built on the first request: routes are all registered by then, in matching order.
        if self._routes is None:
            table = []
            for ctx in iter_route_contexts(fastapi_app.routes):
                methods = getattr(ctx.original_route, "methods", None)
                if not ctx.path_format or not methods:
                    continue
                regex, _, _ = compile_path(ctx.path_format)
                table.append(_Route(regex, frozenset(methods), ctx.path_format))
            self._routes = table
        return self._routes

    def _find(self, fastapi_app: Any, method: str, path: str) -> tuple[str, dict[str, str]]:
        """(path template, path params) of the route Starlette will pick; ("", {}) if none."""
        for route in self._route_table(fastapi_app):
            match = route.regex.match(path)
            if match and method in route.methods:
                return route.path, match.groupdict()
        return "", {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fastapi_app = scope["app"]
        method: str = scope["method"]
        # The path Starlette routes on (without a `--root-path` prefix), so both agree.
        template, params = self._find(fastapi_app, method, get_route_path(scope))
        if not template:  # 404 / 405: the app answers those
            await self.app(scope, receive, send)
            return
        rule = rule_for(method, template)
        state = fastapi_app.state
        what = f"{method} {template}"
        audited = (
            rule is not None and rule.scope in AUDITED and method not in ("GET", "HEAD", "OPTIONS")
        )
        caller: Principal | None = None
        try:
            if rule is None:
                log.error("access.undeclared_route", route=what)
                raise ApiError(403, "forbidden", f"{what}: no access rule declared for this route")
            if rule.scope is not None:
                token = credentials(Request(scope).headers)
                if token is not None or not rule.key_in_body:
                    # (Without a header, an event route reads `writeKey` from its body and
                    # checks it with the same keyring: api.deps.check_write_key.)
                    caller = state.keyring.authenticate(token or "")
                    authorize(caller, rule.scope, what)
            if rule.body_limit:
                receive = await _limited(scope, receive, state.settings.max_request_bytes)
        except ApiError as refused:
            if audited and caller is not None:  # a known key was refused: worth a record
                await self._record(state.pool, caller, what, params, refused.status)
            await _answer(refused)(scope, receive, send)
            return
        scope[PRINCIPAL] = caller
        keyring_token = current_keyring.set(state.keyring)
        try:
            if audited and caller is not None:
                assert rule is not None
                await self._audited(state.pool, scope, receive, send, rule, caller, what, params)
            else:
                await self.app(scope, receive, send)
        finally:
            current_keyring.reset(keyring_token)

    async def _audited(
        self,
        pool: asyncpg.Pool,
        scope: Scope,
        receive: Receive,
        send: Send,
        rule: Rule,
        principal: Principal,
        what: str,
        params: dict[str, str],
    ) -> None:
        thing_id = None
        if rule.versions:
            thing_id = params.get(f"{rule.versions[:-1]}_id") or _body_id(scope)
        before = await audit.current_version(pool, rule.versions, thing_id) if thing_id else None
        held: list[Message] = []
        status: int | None = None

        async def hold(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            held.append(message)

        try:
            await self.app(scope, receive, hold)
        finally:
            # Recorded before the answer leaves, so a client that saw the answer can find the
            # entry; a request that crashed is recorded as 500.
            await self._record(pool, principal, what, params, status or 500, rule, thing_id, before)
        for message in held:
            await send(message)

    async def _record(
        self,
        pool: asyncpg.Pool,
        principal: Principal,
        action: str,
        params: dict[str, str],
        status: int,
        rule: Rule | None = None,
        thing_id: str | None = None,
        before: int | None = None,
    ) -> None:
        fields: dict[str, Any] = {
            "key_id": principal.key_id,
            "action": action,
            "target": _impersonal(params),
            "status": status,
            "before_version": before,
        }
        try:
            if rule is not None and rule.versions and thing_id:
                fields["after_version"] = await audit.current_version(pool, rule.versions, thing_id)
                if thing_id not in params.values():  # it came from the body
                    fields["target"] = {**params, "id": thing_id}
            await audit.append(pool, **fields)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            # The action itself already happened (and committed); answering an error now would
            # make the client retry it. The entry goes to the log instead, loudly.
            log.error("audit.write_failed", error=str(err), **fields)


# Path parameters that name a person (a customer ref: id, userId, email; an address). The
# append-only audit log keeps only their SHA-256 (the same hash the erasure record keeps of a
# ref), so erasing a customer leaves nothing readable of them in it, and an auditor can still
# find a customer's entries by hashing the ref.
PERSONAL_PARAMS = frozenset({"ref", "address"})


def _impersonal(params: dict[str, str]) -> dict[str, str]:
    return {
        k: "sha256:" + hashlib.sha256(v.encode()).hexdigest() if k in PERSONAL_PARAMS else v
        for k, v in params.items()
    }


async def _limited(scope: Scope, receive: Receive, limit: int) -> Receive:
    """The body, read up to `limit` bytes (413 past it), replayed to the route."""
    declared = dict(scope["headers"]).get(b"content-length")
    too_large = ApiError(
        413, "too_large", f"body: exceeds the {limit // 1024} KiB limit for this route"
    )
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid_request", "Content-Length: not a number")
        if int(declared) > limit:
            raise too_large
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > limit:
            raise too_large
        if not message.get("more_body", False):
            break
    scope["journeys.body"] = bytes(body)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}
        return await receive()

    return replay


def _body_id(scope: Scope) -> str | None:
    """The `id` of a JSON or YAML body (POST /v1/journeys, POST /v1/templates: `api.body`),
    for the audit log."""
    raw = scope.get("journeys.body") or b"null"
    kind = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
    try:
        body = parse_yaml(raw).data if kind.decode("latin-1") in YAML_TYPES else json.loads(raw)
    except (ValueError, UnicodeDecodeError):  # TextError is a ValueError
        return None
    value = body.get("id") if isinstance(body, dict) else None
    return value if isinstance(value, str) and value else None
