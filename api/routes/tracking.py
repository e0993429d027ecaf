"""Open pixel and click redirects (no auth: the signed token is the credential).

Tokens come from `activities.tracking.instrument`; a click redirects only to a URL recorded in
the message's `links`, so a token can never send a reader somewhere the message did not."""

from __future__ import annotations

import base64

import asyncpg
from fastapi import APIRouter, Response
from fastapi.responses import RedirectResponse

from activities.links import BadLink, verify
from api.deps import PoolDep, SettingsDep
from api.errors import ApiError
from store.feedback import SentMessage, get_message, record_click, record_open

router = APIRouter(prefix="/v1/t", tags=["tracking"])

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_NO_CACHE = {
    "Cache-Control": "no-cache, no-store, must-revalidate, private, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
_MAX_BIGINT = 2**63 - 1


def _payload(token: str, secret: str, kind: str) -> dict[str, str]:
    try:
        p = verify(secret, token)
    except BadLink as err:
        raise ApiError(400, "invalid_link", f"token: {err}") from None
    m = p.get("m")
    if p.get("k") != kind or not isinstance(m, str) or not m.isdigit() or int(m) > _MAX_BIGINT:
        what = "an open" if kind == "o" else "a click"
        raise ApiError(400, "invalid_link", f"token: not {what} token")
    return p


async def _message(conn: asyncpg.Connection, p: dict[str, str]) -> SentMessage:
    msg = await get_message(conn, int(p["m"]))
    if msg is None:
        raise ApiError(404, "not_found", "token: unknown message")
    return msg


@router.get("/o/{token}", response_class=Response)
async def opened(token: str, pool: PoolDep, settings: SettingsDep) -> Response:
    """The open pixel: records the first open and answers a 1x1 transparent GIF."""
    p = _payload(token, settings.link_secret, "o")
    async with pool.acquire() as conn, conn.transaction():
        await record_open(conn, await _message(conn, p))
    return Response(PIXEL, media_type="image/gif", headers=_NO_CACHE)


@router.get("/c/{token}", response_class=RedirectResponse, status_code=302)
async def clicked(token: str, pool: PoolDep, settings: SettingsDep) -> RedirectResponse:
    """A tracked link: records the click and redirects (302) to the URL the message held."""
    p = _payload(token, settings.link_secret, "c")
    url = p.get("u")
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        raise ApiError(400, "invalid_link", "token: no http(s) URL")
    async with pool.acquire() as conn, conn.transaction():
        msg = await _message(conn, p)
        if url not in msg.links:
            raise ApiError(400, "invalid_link", "token: the URL is not a link of this message")
        await record_click(conn, msg, url)
    return RedirectResponse(url, status_code=302, headers=_NO_CACHE)
