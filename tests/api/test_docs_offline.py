"""/docs and /redoc render with no internet: a real browser (Debian's headless Chromium, driven
by Playwright; nothing is downloaded) opens them from the API under uvicorn, with every request
that is not to 127.0.0.1 aborted. Swagger UI must list the operations, offer "Authorize" with
both kinds of key, show a real journey as the example body, and log no console error.

Chromium comes from `apt-get install chromium`, which `make test` does when it is missing; this
test fails (it does not skip) without it, so a machine without a browser cannot pass unseen.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, Route, async_playwright

from tests.api.live_server import live_api

# Screenshots for a person to look at (docs-top.png, docs-publish-example.png, redoc.png).
ARTIFACTS = Path(
    os.environ.get("TEST_ARTIFACTS_DIR") or Path(tempfile.gettempdir()) / "journeys-test-artifacts"
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        await browser.close()


class Offline:
    """A page that can reach only 127.0.0.1; what it tried beyond, and its console errors."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.blocked: list[str] = []
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda err: self.errors.append(f"page error: {err}"))

    async def start(self) -> Offline:
        await self.page.route("**/*", self._only_loopback)
        return self

    async def _only_loopback(self, route: Route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            await route.continue_()
        else:
            self.blocked.append(route.request.url)
            await route.abort("internetdisconnected")

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")


async def test_swagger_ui_renders_offline_with_authorize_and_real_examples(
    db, settings, browser: Browser
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with live_api(settings) as url:
        tab = await Offline(await browser.new_page()).start()
        page = tab.page
        await page.goto(f"{url}/docs")

        operations = page.locator(".opblock")
        await operations.first.wait_for(state="visible", timeout=30_000)
        assert await operations.count() > 50
        runs = page.locator(".opblock-summary-path", has_text="/v1/journeys/{journey_id}/runs")
        assert await runs.count() == 1

        authorize = page.locator("button.authorize")
        await authorize.wait_for(state="visible")
        await page.screenshot(path=str(ARTIFACTS / "docs-top.png"))
        assert "Authorize" in await authorize.inner_text()
        await authorize.click()
        dialog = page.locator(".dialog-ux")
        await dialog.wait_for(state="visible")
        schemes = await dialog.inner_text()
        assert "writeKey" in schemes and "adminKey" in schemes
        assert "Basic" in schemes and "Bearer" in schemes
        await page.locator(".dialog-ux .close-modal").click()

        # The body example of POST /v1/journeys is a real journey, not {"additionalProp1": {}}.
        publish = page.locator("#operations-journeys-publish_journey_v1_journeys_post")
        await publish.locator(".opblock-summary").click()
        # "Try it out" is on: the body is an editable text area, filled with the example.
        example = publish.locator(".opblock-section-request-body textarea.body-param__text")
        await example.wait_for(state="visible")
        text = await example.input_value()
        assert "welcome_series" in text and "additionalProp1" not in text

        await page.screenshot(path=str(ARTIFACTS / "docs-publish-example.png"))
        assert tab.blocked == [], f"/docs asked the internet for {tab.blocked}"
        assert tab.errors == [], tab.errors


async def test_redoc_renders_offline(db, settings, browser: Browser) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with live_api(settings) as url:
        tab = await Offline(await browser.new_page()).start()
        await tab.page.goto(f"{url}/redoc")
        title = tab.page.locator("h1", has_text="Journeys")
        await title.first.wait_for(state="visible", timeout=30_000)
        menu = tab.page.locator("[role=menuitem], .menu-content li")
        assert await menu.count() > 10
        await tab.page.screenshot(path=str(ARTIFACTS / "redoc.png"))
        assert tab.blocked == [], f"/redoc asked the internet for {tab.blocked}"
        # The one thing refused: ReDoc's decorative footer logo (it hides it then), by the
        # page's Content-Security-Policy, before any request is made.
        others = [e for e in tab.errors if "cdn.redoc.ly/redoc/logo-mini.svg" not in e]
        assert others == [], tab.errors
