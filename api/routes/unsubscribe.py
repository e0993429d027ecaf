"""One-click unsubscribe (RFC 8058): the signed link itself is the credential.

GET shows a confirmation page and changes nothing (mail scanners follow links); POST (the
mail client's one-click `List-Unsubscribe=One-Click`, or the page's button) unsubscribes."""

from __future__ import annotations

from html import escape

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from activities.links import BadLink, verify
from api.deps import PoolDep, SettingsDep
from api.errors import ApiError
from store.feedback import set_subscription

router = APIRouter(tags=["contact"])


def _payload(token: str, secret: str) -> dict[str, str]:
    try:
        p = verify(secret, token)
    except BadLink as err:
        raise ApiError(400, "invalid_link", f"token: {err}") from None
    if not all(isinstance(p.get(k), str) for k in ("c", "ch", "t")):
        raise ApiError(400, "invalid_link", "token: incomplete")
    return p


@router.get("/v1/unsubscribe/{token}", response_class=HTMLResponse)
async def unsubscribe_page(token: str, settings: SettingsDep) -> HTMLResponse:
    p = _payload(token, settings.link_secret)
    return HTMLResponse(
        f"<!doctype html><title>Unsubscribe</title><form method=post>"
        f"<p>Stop {escape(p['t'])} messages by {escape(p['ch'])}?</p>"
        f"<button name=List-Unsubscribe value=One-Click>Unsubscribe</button></form>"
    )


@router.post("/v1/unsubscribe/{token}", response_class=HTMLResponse)
async def unsubscribe(token: str, pool: PoolDep, settings: SettingsDep) -> HTMLResponse:
    p = _payload(token, settings.link_secret)
    cid = await pool.fetchval(
        "SELECT coalesce(merged_into, id) FROM customers WHERE id = $1", p["c"]
    )
    if cid is None:
        raise ApiError(404, "not_found", "token: unknown customer")
    async with pool.acquire() as conn, conn.transaction():
        await set_subscription(conn, cid, p["ch"], p["t"], "unsubscribed", "link")
    return HTMLResponse("<!doctype html><title>Unsubscribed</title><p>You are unsubscribed.</p>")
