"""Validate and publish answers carry `warnings`: valid definitions that probably do not mean
what they say (reading the entry event after a wait_for). Existing fields are unchanged."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import ADMIN


def _survey(read: str) -> dict[str, Any]:
    return {
        "id": "survey", "name": "Survey",
        "entry": {"event": "Survey Sent"},
        "steps": [
            {"id": "ask", "kind": "wait_for", "timeout": "3d", "events": [
                {"event": "Survey Answered",
                 "conditions": {"path": "event.properties.score", "op": "exists"}}]},
            {"id": "thanks", "kind": "send", "template": {"body": "You gave {{ " + read + " }}"}},
        ],
    }  # fmt: skip


WARNING = (
    "step 'thanks': template.body reads event.properties.score, from the entry event "
    "(Survey Sent); the event wait_for 'ask' matched is trigger.properties.score "
    "(or results.ask.event.properties.score)"
)


async def test_validate_and_publish_answer_with_warnings(api):
    r = await api.post(
        "/v1/journeys/survey/validate", json=_survey("event.properties.score"), headers=ADMIN
    )
    assert (r.status_code, r.json()) == (200, {"valid": True, "errors": [], "warnings": [WARNING]})

    r = await api.put(
        "/v1/journeys/survey/draft", json=_survey("event.properties.score"), headers=ADMIN
    )
    assert r.json()["warnings"] == [WARNING]
    r = await api.post("/v1/journeys/survey/publish", headers=ADMIN)
    assert (r.status_code, r.json()["current_version"], r.json()["warnings"]) == (200, 1, [WARNING])

    r = await api.post("/v1/journeys", json=_survey("trigger.properties.score"), headers=ADMIN)
    assert (r.status_code, r.json()["current_version"], r.json()["warnings"]) == (200, 2, [])
    r = await api.get("/v1/journeys/survey", headers=ADMIN)
    assert r.json()["warnings"] == []


async def test_an_unknown_field_is_an_error_naming_the_fix(api):
    r = await api.post("/v1/journeys/survey/validate", json=_survey("customer.id"), headers=ADMIN)
    body = r.json()
    assert (r.status_code, body["valid"], body["warnings"]) == (200, False, [])
    assert body["errors"][0].startswith("steps[1].template.body (step 'thanks', line 1, ")
    assert "): customer.id: no such field, did you mean " in body["errors"][0]
    assert "customer.customer_id?" in body["errors"][0]
    r = await api.post("/v1/journeys", json=_survey("customer.id"), headers=ADMIN)
    assert r.status_code == 400
    assert "did you mean customer.customer_id?" in r.json()["message"]
