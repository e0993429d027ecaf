"""Scoped API keys: created (token shown once, only its hash stored), used, listed, revoked;
through the API and through the CLI (another process: the API learns of it by NOTIFY)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import httpx

from core.settings import ROOT
from tests.api.conftest import ADMIN, WRITE
from tests.api.test_read_api import HELLO
from tests.conftest import eventually


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _create(api: httpx.AsyncClient, *scopes: str, name: str = "k") -> dict:
    r = await api.post("/v1/keys", json={"name": name, "scopes": list(scopes)}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


async def test_a_key_is_shown_once_and_stored_hashed(api, db):
    key = await _create(api, "read", "manage", name="ci deploy")
    token = key["token"]
    assert token.startswith(f"jk_{key['id']}_") and len(token) > 50
    assert key["scopes"] == ["read", "manage"] and key["created_by"] == "env:admin"
    row = await db.fetchrow("SELECT * FROM api_keys WHERE id = $1", key["id"])
    assert row["secret_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(dict(row))
    listed = (await api.get("/v1/keys", headers=ADMIN)).json()
    assert [k["id"] for k in listed] == [key["id"]]
    assert "token" not in listed[0] and "secret_hash" not in listed[0]
    assert (await api.get("/v1/journeys", headers=bearer(token))).status_code == 200
    assert (await api.post("/v1/journeys", json=HELLO, headers=bearer(token))).status_code == 200


async def test_revoked_keys_stop_working_at_once(api, db):
    key = await _create(api, "read")
    assert (await api.get("/v1/journeys", headers=bearer(key["token"]))).status_code == 200
    r = await api.delete(f"/v1/keys/{key['id']}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["revoked_at"] and r.json()["revoked_by"] == "env:admin"
    r = await api.get("/v1/journeys", headers=bearer(key["token"]))
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert (await api.get("/v1/keys", headers=ADMIN)).json() == []
    listed = (await api.get("/v1/keys?include_revoked=true", headers=ADMIN)).json()
    assert [k["id"] for k in listed] == [key["id"]]
    r = await api.delete("/v1/keys/nope", headers=ADMIN)
    assert r.status_code == 404 and "key_id" in r.json()["message"]


async def test_a_tampered_token_is_401(api, db):
    token = (await _create(api, "read"))["token"]
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    r = await api.get("/v1/journeys", headers=bearer(forged))
    assert r.status_code == 401


async def test_only_admin_keys_manage_keys(api, db):
    manage = (await _create(api, "manage", "read", "operate"))["token"]
    r = await api.post("/v1/keys", json={"name": "x", "scopes": ["admin"]}, headers=bearer(manage))
    assert r.status_code == 403 and "admin" in r.json()["message"]
    admin = (await _create(api, "admin"))["token"]
    r = await api.post("/v1/keys", json={"name": "y", "scopes": ["read"]}, headers=bearer(admin))
    assert r.status_code == 201
    assert r.json()["created_by"] == admin.split("_")[1]  # the creating key's id


async def test_unknown_scopes_are_refused_by_name(api, db):
    r = await api.post("/v1/keys", json={"name": "x", "scopes": ["read", "root"]}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    assert "scopes" in r.json()["message"] and "root" in r.json()["message"]
    r = await api.post("/v1/keys", json={"name": "x", "scopes": []}, headers=ADMIN)
    assert r.status_code == 400 and "scopes" in r.json()["message"]


async def test_ingest_keys_send_events_by_basic_auth_and_write_key(api, db):
    token = (await _create(api, "ingest"))["token"]
    event = {"userId": "u", "event": "E", "type": "track", "messageId": "m1"}
    r = await api.post("/v1/track", json=event, auth=httpx.BasicAuth(token, ""))
    assert r.status_code == 200, r.text
    r = await api.post("/v1/track", json={**event, "messageId": "m2", "writeKey": token})
    assert r.status_code == 200, r.text
    assert (await api.post("/v1/track", json={**event, "messageId": "m3"}, auth=WRITE)).is_success
    read = (await _create(api, "read"))["token"]
    r = await api.post("/v1/track", json={**event, "messageId": "m4", "writeKey": read})
    assert r.status_code == 403 and "ingest" in r.json()["message"]
    r = await api.get("/v1/journeys", headers=bearer(token))
    assert r.status_code == 403
    assert await db.fetchval("SELECT count(*) FROM events") == 3


def _cli(pg_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": pg_url}
    return subprocess.run(
        [sys.executable, "-m", "api.keys_cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_cli_creates_lists_and_revokes_keys(api, db, pg_url):
    proc = _cli(pg_url, "create", "--name", "ops laptop", "--scope", "operate", "--scope", "read")
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    key_id = token.split("_")[1]
    assert "shown only once" in proc.stderr

    async def works() -> bool:
        return (await api.get("/v1/journeys", headers=bearer(token))).status_code == 200

    await eventually(works, what="the API to accept a key created by the CLI")
    listed = _cli(pg_url, "list")
    assert key_id in listed.stdout and token not in listed.stdout
    proc = _cli(pg_url, "revoke", key_id)
    assert proc.returncode == 0, proc.stderr

    async def refused() -> bool:
        return (await api.get("/v1/journeys", headers=bearer(token))).status_code == 401

    await eventually(refused, what="the API to refuse a key revoked by the CLI")
    actions = await db.fetch("SELECT key_id, action FROM audit_log ORDER BY id")
    assert [r["action"] for r in actions] == ["key.create", "key.revoke"]
    assert all(r["key_id"].startswith("cli:") for r in actions)
    assert _cli(pg_url, "create", "--name", "x", "--scope", "root").returncode != 0
