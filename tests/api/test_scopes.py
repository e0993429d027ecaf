"""Every route declares who may call it, and each scope opens exactly its own routes.

The app's route table is walked: a route missing from `api.scopes.ROUTE_SCOPES` fails here, so
no route ships open (or shut) by accident. Then one key per scope, the two bootstrap keys, no
key and an unknown key call every route: 401 without a valid key, 403 for a valid key without
the route's scope, neither for a key that has it (whatever the route then answers).
"""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from api.main import create_app
from api.scopes import ADMIN_KEY_SCOPES, ROUTE_SCOPES, SCOPES, WRITE_KEY_SCOPES
from core.settings import Settings
from tests.api.conftest import ADMIN_KEY, WRITE_KEY

UNKNOWN_KEY = "jk_0123456789ab_" + "x" * 43


def _app_routes(app) -> set[tuple[str, str]]:
    routes = set()
    for ctx in iter_route_contexts(app.routes):
        for method in getattr(ctx.original_route, "methods", None) or ():
            if method != "HEAD":
                routes.add((method, ctx.path_format))
    return routes


def test_every_route_declares_its_scope() -> None:
    routes = _app_routes(create_app(Settings()))
    undeclared = sorted(routes - ROUTE_SCOPES.keys())
    assert not undeclared, f"routes without an entry in api/scopes.py ROUTE_SCOPES: {undeclared}"
    stale = sorted(ROUTE_SCOPES.keys() - routes)
    assert not stale, f"ROUTE_SCOPES entries for routes that do not exist: {stale}"
    for key, rule in ROUTE_SCOPES.items():
        assert rule.scope is not None or rule.public, f"{key}: public without a reason"


def _url(path: str) -> str:
    # Any value will do: authorization is decided before the route looks at it.
    return re.sub(r"\{(\w+)\}", lambda m: "1" if m.group(1) == "version" else "x", path)


async def _call(api: httpx.AsyncClient, method: str, path: str, key: str | None, ingest: bool):
    headers = {}
    if key is not None:
        # Event routes take their key as HTTP Basic (Segment clients do); the others Bearer.
        headers = (
            {"Authorization": httpx.BasicAuth(key, "")._auth_header}
            if ingest
            else {"Authorization": f"Bearer {key}"}
        )
    body = None if method in ("GET", "DELETE") else {}
    return await api.request(method, _url(path), headers=headers, json=body)


def _is_refusal(r: httpx.Response, status: int, code: str) -> bool:
    return r.status_code == status and r.json().get("code") == code and bool(r.json()["message"])


async def test_each_scope_opens_exactly_its_routes(api, db) -> None:
    keys = {}
    for scope in SCOPES:
        r = await api.post(
            "/v1/keys",
            json={"name": scope, "scopes": [scope]},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert r.status_code == 201, r.text
        keys[f"scope:{scope}"] = (r.json()["token"], {scope})
    keys["env:write"] = (WRITE_KEY, set(WRITE_KEY_SCOPES))
    keys["env:admin"] = (ADMIN_KEY, set(ADMIN_KEY_SCOPES))
    wrong: list[str] = []
    for (method, path), rule in sorted(ROUTE_SCOPES.items()):
        if rule.scope is None:
            continue
        ingest = rule.scope == "ingest"
        for who, key in (("no key", None), ("unknown key", UNKNOWN_KEY)):
            r = await _call(api, method, path, key, ingest)
            if not _is_refusal(r, 401, "unauthorized"):
                wrong.append(f"{method} {path} with {who}: {r.status_code} {r.text[:120]}")
        for who, (token, scopes) in keys.items():
            r = await _call(api, method, path, token, ingest)
            if rule.scope in scopes:
                if r.status_code in (401, 403):
                    wrong.append(f"{method} {path} refused {who}: {r.status_code} {r.text}")
            elif not _is_refusal(r, 403, "forbidden") or rule.scope not in r.json()["message"]:
                wrong.append(f"{method} {path} let {who} in: {r.status_code} {r.text[:120]}")
    assert not wrong, "\n".join(wrong)


async def test_public_routes_need_no_key(api, db) -> None:
    for (method, path), rule in ROUTE_SCOPES.items():
        if rule.scope is None:
            r = await api.request(method, _url(path), json=None if method == "GET" else {})
            assert r.status_code not in (401, 403), f"{method} {path}: {r.status_code} {r.text}"


async def test_a_route_without_a_rule_is_refused(settings: Settings, db) -> None:
    app = create_app(settings)

    @app.get("/v1/forgotten")
    async def forgotten() -> dict[str, str]:
        return {"secret": "data"}

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.get("/v1/forgotten", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 403
    assert r.json()["code"] == "forbidden"
    assert "GET /v1/forgotten" in r.json()["message"]


LIMIT = 1024 * 1024


async def test_management_bodies_are_limited(api, db) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    big = b'{"id": "' + b"x" * LIMIT + b'"}'
    r = await api.post("/v1/journeys", content=big, headers=admin)
    assert r.status_code == 413, r.text
    assert r.json() == {"code": "too_large", "message": r.json()["message"]}
    assert "1024 KiB" in r.json()["message"]

    async def chunks():  # no Content-Length: counted while read
        for _ in range(LIMIT // 65536 + 2):
            yield b" " * 65536

    r = await api.post("/v1/templates", content=chunks(), headers=admin)
    assert r.status_code == 413, r.text
    assert r.json()["code"] == "too_large"
    assert await db.fetchval("SELECT count(*) FROM journeys") == 0


@pytest.mark.parametrize("path", ["/v1/unsubscribe/x", "/v1/keys"])
async def test_the_limit_holds_on_public_and_admin_routes_alike(api, db, path) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Length": str(LIMIT + 1)}
    r = await api.post(path, content=b"x" * (LIMIT + 1), headers=headers)
    assert r.status_code == 413
    assert r.json()["code"] == "too_large"


async def test_a_root_path_prefix_does_not_skip_the_access_check(db, settings: Settings) -> None:
    """Behind a proxy (`uvicorn --root-path /api`) the prefix is in the ASGI path; the access
    check must match routes as Starlette does, without it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
            for path in ("/api/v1/keys", "/api/v1/audit", "/api/v1/customers/x"):
                resp = await api.get(path)
                assert resp.status_code == 401, (path, resp.status_code, resp.text)
            ok = await api.get("/api/v1/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert ok.status_code == 200, ok.text


async def test_an_ingest_key_works_as_bearer_on_event_routes(api: httpx.AsyncClient) -> None:
    resp = await api.post(
        "/v1/track",
        headers={"Authorization": f"Bearer {WRITE_KEY}"},
        json={"userId": "u1", "event": "Bearer Works"},
    )
    assert resp.status_code == 200, resp.text


async def test_encoded_bodies_are_refused_outside_the_event_api(api: httpx.AsyncClient) -> None:
    """FastAPI ignores Content-Encoding and parses the bytes: an encoded body would reach the
    route without the input checks, so it is refused (the event API inflates gzip itself)."""
    for encoding in ("gzip", "br", "identity, identity"):
        resp = await api.post(
            "/v1/keys",
            headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Encoding": encoding},
            content=b'{"name": "a\\u0000b", "scopes": ["read"]}',
        )
        assert resp.status_code == 400, (encoding, resp.status_code, resp.text)
        assert resp.json()["code"] == "unsupported_encoding"


async def test_paging_cursors_past_bigint_are_400(api: httpx.AsyncClient) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for path in ("/v1/audit", "/v1/dead-letters"):
        resp = await api.get(path, params={"before": 10**20}, headers=headers)
        assert resp.status_code == 400, (path, resp.status_code, resp.text)
        assert set(resp.json()) == {"code", "message"}
