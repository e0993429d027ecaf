"""Segment HTTP Tracking API: track, identify, page, screen, group, alias, batch."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

from fastapi import APIRouter, Request

from api.access import PRINCIPAL
from api.deps import PoolDep, SettingsDep, basic_user, check_write_key, read_body
from api.errors import ApiError
from models import safe_json
from models.public import Accepted
from models.segment import (
    CALL_MODELS,
    EVENT_TYPES,
    MAX_BATCH_BYTES,
    MAX_EVENT_BYTES,
    AcceptedEvent,
    BatchCall,
    InvalidEvent,
    parse_batch,
    parse_event,
)
from store.events import store_events

router = APIRouter(prefix="/v1", tags=["events"])
# Read, decompressed and checked here (not by api.input_guard): errors name `batch[3]...`.
RAW_BODY_PATHS = frozenset(f"/v1/{kind}" for kind in (*EVENT_TYPES, "batch"))


def _doc_body(model: str) -> dict[str, Any]:
    """The body as OpenAPI shows it (`models.segment` call models, registered as components
    in `api.main`); the route itself reads the raw body."""
    schema = {"$ref": f"#/components/schemas/{model}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _read_json(request: Request, limit: int) -> Any:
    encoding = request.headers.get("content-encoding", "").lower()
    # Compressed bodies are smaller than what they inflate to; the inflated size is checked below.
    raw = await read_body(request, limit if encoding != "gzip" else 2 * limit)
    if encoding == "gzip":
        try:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            raw = d.decompress(raw, limit + 1)
        except (zlib.error, gzip.BadGzipFile, EOFError):
            raise ApiError(400, "invalid_request", "body is not valid gzip") from None
    elif encoding not in ("", "identity"):
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} not supported")
    if len(raw) > limit:
        raise ApiError(400, "too_large", f"request body exceeds {limit // 1024} KB")
    try:
        return safe_json.loads(raw)
    except ValueError as err:
        raise ApiError(400, "invalid_json", f"body: invalid JSON: {err}") from None


async def _accept(pool: PoolDep, events: list[AcceptedEvent]) -> Accepted:
    await store_events(pool, [e.model_dump() for e in events])
    return Accepted()


def _auth(request: Request, settings: SettingsDep, body: Any) -> None:
    if request.scope.get(PRINCIPAL) is not None:
        return  # a key in the header (Basic or Bearer) already passed AccessMiddleware
    key = body.get("writeKey") if isinstance(body, dict) else None
    check_write_key(settings, basic_user(request), key)


@router.post("/batch", response_model=Accepted, openapi_extra=_doc_body(BatchCall.__name__))
async def batch(request: Request, pool: PoolDep, settings: SettingsDep) -> Accepted:
    """Up to 2,500 events / 500 KB; each at most 32 KB. Answers 200 once stored durably."""
    body = await _read_json(request, MAX_BATCH_BYTES)
    _auth(request, settings, body)
    try:
        events = parse_batch(body)
    except InvalidEvent as err:
        raise ApiError(400, "invalid_event", str(err)) from None
    return await _accept(pool, events)


def _single(kind: str) -> Any:
    async def endpoint(request: Request, pool: PoolDep, settings: SettingsDep) -> Accepted:
        body = await _read_json(request, MAX_EVENT_BYTES)
        _auth(request, settings, body)
        try:
            event = parse_event(body, kind=kind)
        except InvalidEvent as err:
            raise ApiError(400, "invalid_event", str(err)) from None
        return await _accept(pool, [event])

    endpoint.__name__ = kind
    endpoint.__doc__ = f"Segment `{kind}` call; answers 200 once stored durably."
    return endpoint


for _kind in EVENT_TYPES:
    router.add_api_route(
        f"/{_kind}",
        _single(_kind),
        methods=["POST"],
        response_model=Accepted,
        openapi_extra=_doc_body(CALL_MODELS[_kind].__name__),
        name=_kind,
    )
