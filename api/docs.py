"""/docs (Swagger UI) and /redoc served from an installed package: they work offline.

FastAPI's own pages load their JavaScript and CSS from a CDN, so on a machine without internet
(air-gapped installs, a laptop on a plane, CI) /docs is a blank page. The assets ship in the
`fastapi-offline` wheel (a maintained bundle of Swagger UI and ReDoc); they are served here by a
route, not a StaticFiles mount: the access middleware (api.access) decides per route from
api/scopes.py, and a mount would bypass that table. Only the files named in `ASSETS` are served.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse

from api.errors import ApiError

ASSET_DIR = Path(str(files("fastapi_offline") / "static"))
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
ASSET_PATH = "/docs/assets"
# A week: the files change only with the package (and the URL is the same then; a reload or
# a restart of the browser picks the new ones up).
CACHE_CONTROL = "public, max-age=604800"
REDOC_CSP = "img-src 'self' data: blob:"


def install(app: FastAPI, openapi_url: str = "/openapi.json") -> None:
    """Add /docs, /docs/oauth2-redirect, /redoc and their assets to `app` (created with
    `docs_url=None, redoc_url=None`)."""

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{root}{ASSET_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSET_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSET_PATH}/favicon.png",
            # No call to the public validator service (validator.swagger.io).
            swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": True},
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSET_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSET_PATH}/favicon.png",
            with_google_fonts=False,  # fonts.googleapis.com: not offline
        )
        # ReDoc's footer always asks cdn.redoc.ly for its logo (and hides it when that fails):
        # images only from here, so the page makes no request off this server.
        page.headers["Content-Security-Policy"] = REDOC_CSP
        return page

    @app.get(ASSET_PATH + "/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise ApiError(404, "not_found", f"name: no docs asset {name!r}")
        return FileResponse(
            ASSET_DIR / name, media_type=media_type, headers={"Cache-Control": CACHE_CONTROL}
        )
