"""Stored templates over the API: immutable versions, checks on write, preview for a customer,
test sends through a real SMTP server, and journeys pinning the version they publish with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.main import create_app
from core.settings import Settings
from tests.api.conftest import ADMIN
from tests.api.test_read_api import assert_error

WELCOME: dict[str, Any] = {
    "id": "welcome",
    "name": "Welcome email",
    "channel": "email",
    "subject": "Welcome, {{ profile.first_name }}",
    "body": "Hi {{ profile.first_name }}, thanks for joining.",
    "html": "<p>Hi {{ profile.first_name }}</p>",
}


def journey(template: dict[str, Any], channel: Any = "email") -> dict[str, Any]:
    return {
        "id": "onboarding",
        "name": "Onboarding",
        "entry": {"type": "track", "event": "Signed Up"},
        "steps": [
            {"id": "greet", "kind": "send", "channel": channel, "template": template},
            {"id": "pause", "kind": "wait", "duration": "1h"},
        ],
    }


async def create(api: httpx.AsyncClient, **changes: Any) -> dict[str, Any]:
    r = await api.post("/v1/templates", json={**WELCOME, **changes}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


async def customer(db, customer_id: str, user_id: str, **traits: Any) -> None:
    await db.execute("INSERT INTO customers (id, traits) VALUES ($1, $2)", customer_id, traits)
    await db.execute(
        "INSERT INTO identities (kind, value, customer_id) VALUES ('user', $1, $2)",
        user_id,
        customer_id,
    )


async def pinned(db, version: int) -> int | None:
    """The template version journey 'onboarding' v`version` stores for its send step."""
    definition = await db.fetchval(
        "SELECT definition FROM journey_versions WHERE journey_id = 'onboarding' AND version = $1",
        version,
    )
    return definition["steps"][0]["template"]["version"]


async def test_versions_are_immutable_and_listed(api):
    created = await create(api)
    assert created["current_version"] == 1
    assert created["subject"] == WELCOME["subject"]
    assert [v["version"] for v in created["versions"]] == [1]

    r = await api.put(
        "/v1/templates/welcome",
        json={"subject": "Hello {{ profile.first_name }}", "body": "v2 body"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    detail = r.json()
    assert (detail["current_version"], detail["body"], detail["html"]) == (2, "v2 body", None)
    assert [v["version"] for v in detail["versions"]] == [1, 2]
    # The same content again is not a new version.
    again = await api.put(
        "/v1/templates/welcome",
        json={"subject": "Hello {{ profile.first_name }}", "body": "v2 body"},
        headers=ADMIN,
    )
    assert again.json()["current_version"] == 2

    first = (await api.get("/v1/templates/welcome/versions/1", headers=ADMIN)).json()
    assert (first["version"], first["body"], first["html"]) == (1, WELCOME["body"], WELCOME["html"])
    assert (await api.get("/v1/templates/welcome", headers=ADMIN)).json()["body"] == "v2 body"

    await create(api, id="sms_code", channel="sms", subject=None, html=None, body="Code: 1234")
    listed = (await api.get("/v1/templates", headers=ADMIN)).json()
    assert [(t["id"], t["channel"], t["current_version"]) for t in listed] == [
        ("sms_code", "sms", 1),
        ("welcome", "email", 2),
    ]

    assert_error(
        await api.post("/v1/templates", json=WELCOME, headers=ADMIN), 409, "already_exists"
    )
    assert_error(
        await api.put("/v1/templates/nope", json={"body": "x"}, headers=ADMIN), 404, "not_found"
    )
    assert_error(
        await api.get("/v1/templates/welcome/versions/3", headers=ADMIN), 404, "not_found", "v3"
    )
    assert_error(await api.get("/v1/templates/nope", headers=ADMIN), 404, "not_found", "nope")
    assert (await api.get("/v1/templates")).status_code == 401


async def test_invalid_content_is_refused_naming_the_field(api):
    r = await api.post(
        "/v1/templates", json={**WELCOME, "body": "Hi {{ profile.first_name "}, headers=ADMIN
    )
    assert_error(r, 422, "invalid_template", "body", "template error")
    r = await api.post(
        "/v1/templates", json={**WELCOME, "subject": "Hi {{ user.name }}"}, headers=ADMIN
    )
    assert_error(r, 422, "invalid_template", "subject", "'user'")
    assert (await api.get("/v1/templates", headers=ADMIN)).json() == []

    await create(api)
    r = await api.put(
        "/v1/templates/welcome", json={"body": "ok", "html": "{% if %}"}, headers=ADMIN
    )
    assert_error(r, 422, "invalid_template", "html")
    assert (await api.get("/v1/templates/welcome", headers=ADMIN)).json()["current_version"] == 1

    r = await api.post("/v1/templates", json={**WELCOME, "id": "Bad Id"}, headers=ADMIN)
    assert_error(r, 400, "invalid_request", "id")
    r = await api.post("/v1/templates", json={**WELCOME, "channel": "fax"}, headers=ADMIN)
    assert_error(r, 400, "invalid_request", "channel")
    r = await api.put("/v1/templates/welcome", json={"body": "x", "channel": "sms"}, headers=ADMIN)
    assert_error(r, 400, "invalid_request", "channel")


async def test_preview_renders_the_customers_traits(api, db):
    await customer(db, "c1", "ann", first_name="Ann")
    await create(api, body="Hi {{ profile.first_name }}, your {{ event.properties.item }}")
    r = await api.post(
        "/v1/templates/welcome/preview",
        json={"customer_id": "ann", "event": {"properties": {"item": "Blue Mug"}}},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    shown = r.json()
    assert shown["customer_id"] == "c1"
    assert shown["subject"] == "Welcome, Ann"
    assert shown["body"] == "Hi Ann, your Blue Mug"
    assert shown["html"] == "<p>Hi Ann</p>"

    await api.put(
        "/v1/templates/welcome", json={"body": "v2 {{ customer.customer_id }}"}, headers=ADMIN
    )
    latest = await api.post(
        "/v1/templates/welcome/preview", json={"customer_id": "c1"}, headers=ADMIN
    )
    assert (latest.json()["version"], latest.json()["body"]) == (2, "v2 c1")
    old = await api.post(
        "/v1/templates/welcome/preview",
        json={"customer_id": "c1", "version": 1, "event": {"properties": {"item": "Cup"}}},
        headers=ADMIN,
    )
    assert (old.json()["version"], old.json()["body"]) == (1, "Hi Ann, your Cup")


async def test_preview_with_a_missing_trait_names_it(api, db):
    await customer(db, "c1", "ann", first_name="Ann")
    await create(api, body="Dear {{ profile.last_name }}")
    r = await api.post("/v1/templates/welcome/preview", json={"customer_id": "ann"}, headers=ADMIN)
    assert_error(r, 422, "template_error", "body", "last_name")

    r = await api.post("/v1/templates/welcome/preview", json={"customer_id": "bob"}, headers=ADMIN)
    assert_error(r, 404, "not_found", "customer_id", "bob")
    r = await api.post("/v1/templates/nope/preview", json={"customer_id": "ann"}, headers=ADMIN)
    assert_error(r, 404, "not_found", "nope")


@pytest.fixture
async def smtp_api(db, settings: Settings, smtp) -> AsyncIterator[httpx.AsyncClient]:
    """The API with an email channel on the local SMTP server."""
    _, port = smtp
    app = create_app(settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def test_test_send_delivers_a_marked_test_message(smtp_api, db, smtp):
    recorder, _ = smtp
    await customer(db, "c1", "ann", first_name="Ann")
    await create(smtp_api)
    r = await smtp_api.post(
        "/v1/templates/welcome/test-send",
        json={"to": "qa@example.com", "customer_id": "ann"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    sent = r.json()
    assert (sent["status"], sent["subject"]) == ("sent", "[TEST] Welcome, Ann")
    assert sent["idempotency_key"].startswith("test:")

    (mail,) = recorder.messages()
    assert mail["Subject"] == "[TEST] Welcome, Ann"
    assert mail["To"] == "qa@example.com"
    assert "Hi Ann, thanks for joining." in mail.get_body(("plain",)).get_content()

    row = await db.fetchrow("SELECT * FROM messages WHERE id = $1", sent["message_id"])
    assert row["test"] and row["category"] == "transactional"
    assert (row["customer_id"], row["status"], row["address"]) == ("c1", "sent", "qa@example.com")
    assert (row["template_id"], row["template_version"]) == ("welcome", 1)
    assert row["idempotency_key"] == sent["idempotency_key"]

    # Without a customer: an empty profile, recorded under the customer 'test'.
    await create(smtp_api, id="plain", subject="Hello", body="Plain text", html=None)
    r = await smtp_api.post(
        "/v1/templates/plain/test-send", json={"to": "qa@example.com"}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    assert len(recorder.messages()) == 2
    assert (
        await db.fetchval("SELECT customer_id FROM messages WHERE id = $1", r.json()["message_id"])
        == "test"
    )
    # An empty profile has no first_name: a render error, nothing sent or recorded.
    r = await smtp_api.post(
        "/v1/templates/welcome/test-send", json={"to": "qa@example.com"}, headers=ADMIN
    )
    assert_error(r, 422, "template_error", "first_name")
    assert await db.fetchval("SELECT count(*) FROM messages") == 2


async def test_test_send_on_a_channel_not_configured_here(api, db):
    await create(api, id="sms_code", channel="sms", subject=None, html=None, body="Code: 1234")
    r = await api.post("/v1/templates/sms_code/test-send", json={"to": "+15550001"}, headers=ADMIN)
    assert_error(r, 409, "channel_unavailable", "sms")
    assert await db.fetchval("SELECT count(*) FROM messages") == 0


async def test_publish_refuses_a_reference_that_does_not_resolve(api):
    r = await api.post("/v1/journeys", json=journey({"ref": "nope"}), headers=ADMIN)
    assert_error(r, 400, "invalid_definition", "step 'greet'", "template.ref", "'nope'")
    r = await api.post(
        "/v1/journeys/onboarding/validate", json=journey({"ref": "nope"}), headers=ADMIN
    )
    assert r.json()["valid"] is False
    assert "step 'greet'" in r.json()["errors"][0] and "'nope'" in r.json()["errors"][0]

    await create(api)
    r = await api.post(
        "/v1/journeys", json=journey({"ref": "welcome", "version": 4}), headers=ADMIN
    )
    assert_error(r, 400, "invalid_definition", "step 'greet'", "no version 4")
    r = await api.post("/v1/journeys", json=journey({"ref": "welcome"}, "sms"), headers=ADMIN)
    assert_error(r, 400, "invalid_definition", "step 'greet'", "email", "sms")
    # A fallback list that includes email, or `best`, fits an email template.
    for channel in (["sms", "email"], "best"):
        r = await api.post("/v1/journeys", json=journey({"ref": "welcome"}, channel), headers=ADMIN)
        assert r.status_code == 200, r.text
    r = await api.post(
        "/v1/journeys/onboarding/validate", json=journey({"ref": "welcome"}), headers=ADMIN
    )
    assert r.json() == {"valid": True, "errors": [], "warnings": []}


async def test_publish_pins_the_template_version(api, db):
    await create(api)
    r = await api.post("/v1/journeys", json=journey({"ref": "welcome"}), headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["current_version"] == 1
    template = r.json()["definition"]["steps"][0]["template"]
    assert (template["ref"], template["version"]) == ("welcome", 1)

    await api.put("/v1/templates/welcome", json={"body": "v2"}, headers=ADMIN)
    assert await pinned(db, 1) == 1  # published runs keep rendering v1

    r = await api.post("/v1/journeys", json=journey({"ref": "welcome"}), headers=ADMIN)
    assert r.json()["current_version"] == 2
    assert await pinned(db, 2) == 2
    # Unchanged definition and template: no new journey version.
    r = await api.post("/v1/journeys", json=journey({"ref": "welcome"}), headers=ADMIN)
    assert r.json()["current_version"] == 2
    # An explicit version stays as given.
    r = await api.post(
        "/v1/journeys", json=journey({"ref": "welcome", "version": 1}), headers=ADMIN
    )
    assert r.json()["current_version"] == 3
    assert await pinned(db, 3) == 1
