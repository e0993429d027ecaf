"""The audit log: every change on manage/operate/admin routes, by whom, on what, how it ended,
with before/after versions; append-only; readable by admin keys only."""

from __future__ import annotations

import asyncpg
import pytest

from tests.api.conftest import ADMIN
from tests.api.test_read_api import HELLO


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _audit(api, **params) -> list[dict]:
    r = await api.get("/v1/audit", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["items"]


async def test_publishing_records_who_what_and_the_versions(api, db):
    r = await api.post("/v1/journeys", json=HELLO, headers=ADMIN)
    assert r.status_code == 200, r.text
    changed = {**HELLO, "name": "Hello again"}
    assert (await api.post("/v1/journeys", json=changed, headers=ADMIN)).status_code == 200
    await api.get("/v1/journeys/hello", headers=ADMIN)  # reads are not audited
    second, first = await _audit(api)
    assert first["key_id"] == "env:admin"
    assert first["action"] == "POST /v1/journeys"
    assert first["target"] == {"id": "hello"}
    assert (first["status"], first["before_version"], first["after_version"]) == (200, None, 1)
    assert (second["before_version"], second["after_version"]) == (1, 2)
    r = await api.post("/v1/journeys/hello/pause", json={"in_flight": "hold"}, headers=ADMIN)
    (pause,) = await _audit(api, action="POST /v1/journeys/{journey_id}/pause")
    assert pause["target"] == {"journey_id": "hello"} and pause["status"] == r.status_code
    assert (pause["before_version"], pause["after_version"]) == (2, 2)


async def test_failures_and_refusals_are_recorded_too(api, db):
    r = await api.post("/v1/journeys", json={"id": "bad"}, headers=ADMIN)
    assert r.status_code == 400
    r = await api.post("/v1/keys", json={"name": "reader", "scopes": ["read"]}, headers=ADMIN)
    reader = r.json()
    r = await api.post("/v1/journeys", json=HELLO, headers=bearer(reader["token"]))
    assert r.status_code == 403
    r = await api.post("/v1/journeys", json=HELLO)  # no key: nobody to record
    assert r.status_code == 401
    entries = await _audit(api)
    assert [(e["key_id"], e["action"], e["status"]) for e in reversed(entries)] == [
        ("env:admin", "POST /v1/journeys", 400),
        ("env:admin", "key.create", None),
        ("env:admin", "POST /v1/keys", 201),
        (reader["id"], "POST /v1/journeys", 403),
    ]
    assert await db.fetchval("SELECT count(*) FROM journeys") == 0


async def test_key_changes_name_the_key(api, db):
    r = await api.post("/v1/keys", json={"name": "ci", "scopes": ["manage"]}, headers=ADMIN)
    key_id = r.json()["id"]
    await api.delete(f"/v1/keys/{key_id}", headers=ADMIN)
    entries = await _audit(api, target=key_id)
    # The store records the revocation in its own transaction; the request's entry follows.
    assert [e["action"] for e in reversed(entries)] == [
        "key.create",
        "key.revoke",
        "DELETE /v1/keys/{key_id}",
    ]
    created = next(e for e in entries if e["action"] == "key.create")
    assert created["detail"] == {"name": "ci", "scopes": ["manage"]}


async def test_pages_and_filters(api, db):
    for i in range(5):
        body = {**HELLO, "id": f"j{i}"}
        assert (await api.post("/v1/journeys", json=body, headers=ADMIN)).status_code == 200
    r = await api.get("/v1/audit", params={"limit": 2}, headers=ADMIN)
    page = r.json()
    assert [e["target"]["id"] for e in page["items"]] == ["j4", "j3"]
    params = {"limit": 2, "before": page["next_before"]}
    r = await api.get("/v1/audit", params=params, headers=ADMIN)
    assert [e["target"]["id"] for e in r.json()["items"]] == ["j2", "j1"]
    assert [e["target"]["id"] for e in await _audit(api, target="j3")] == ["j3"]
    assert await _audit(api, action="DELETE /v1/keys/{key_id}") == []


async def test_the_log_is_append_only(api, db):
    await api.post("/v1/journeys", json=HELLO, headers=ADMIN)
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("UPDATE audit_log SET status = 200")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("DELETE FROM audit_log")
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 1


async def test_only_admin_keys_read_the_log(api, db):
    r = await api.post("/v1/keys", json={"name": "r", "scopes": ["read"]}, headers=ADMIN)
    r = await api.get("/v1/audit", headers=bearer(r.json()["token"]))
    assert r.status_code == 403 and "admin" in r.json()["message"]
