"""The Segment HTTP Tracking API: auth, encodings, validation, limits, storage.

Every rejected request must answer the exact status with `{"code": ..., "message": ...}`
naming the offending field, and must leave the `events` table untouched.
"""

from __future__ import annotations

import base64
import gzip
import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.api.conftest import ADMIN_KEY, WRITE, WRITE_KEY

OK = {"success": True}


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def compact(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def ev(i: int = 0, **extra: Any) -> dict[str, Any]:
    """A tiny track event for a batch."""
    return {"type": "track", "userId": "u", "event": "e", "messageId": f"m{i}", **extra}


async def count(db) -> int:
    return await db.fetchval("SELECT count(*) FROM events")


def assert_error(r: httpx.Response, status: int, code: str, *names: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message"}, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    for name in names:
        assert name in body["message"], body
    return body["message"]


async def post(api: httpx.AsyncClient, path: str, body: Any, **kw: Any) -> httpx.Response:
    kw.setdefault("auth", WRITE)
    return await api.post(path, json=body, **kw)


# -- success ---------------------------------------------------------------------------

SINGLE = {
    "track": {"userId": "u1", "event": "Item Purchased", "properties": {"revenue": 14.99}},
    "identify": {"userId": "u1", "traits": {"email": "p@example.com"}},
    "page": {"userId": "u1", "name": "Home"},
    "screen": {"anonymousId": "a1", "name": "Home"},
    "group": {"userId": "u1", "groupId": "g1", "traits": {"name": "Initech"}},
    "alias": {"userId": "u1", "previousId": "a1"},
}


@pytest.mark.parametrize("kind", list(SINGLE))
async def test_single_endpoint_answers_200_success_and_stores(api, db, kind):
    r = await post(api, f"/v1/{kind}", {**SINGLE[kind], "messageId": f"m-{kind}"})
    assert r.status_code == 200, r.text
    assert r.json() == OK
    row = await db.fetchrow("SELECT * FROM events")
    assert row["type"] == kind
    assert row["message_id"] == f"m-{kind}"
    assert await count(db) == 1


async def test_batch_answers_200_success_and_stores_every_type(api, db):
    batch = [{"type": k, **v, "messageId": f"m-{k}"} for k, v in SINGLE.items()]
    r = await post(api, "/v1/batch", {"batch": batch})
    assert r.status_code == 200, r.text
    assert r.json() == OK
    rows = await db.fetch("SELECT type FROM events")
    assert sorted(x["type"] for x in rows) == sorted(SINGLE)


# -- auth ------------------------------------------------------------------------------


async def test_basic_auth_with_key_and_empty_password(api, db):
    r = await api.post("/v1/track", json=ev(), headers=basic(WRITE_KEY))
    assert r.status_code == 200, r.text
    assert r.json() == OK
    assert await count(db) == 1


async def test_write_key_in_body_without_header(api, db):
    r = await api.post("/v1/track", json={**ev(), "writeKey": WRITE_KEY})
    assert r.status_code == 200, r.text
    r = await api.post("/v1/batch", json={"batch": [ev(2)], "writeKey": WRITE_KEY})
    assert r.status_code == 200, r.text
    assert await count(db) == 2


async def test_second_key_of_the_list_works(api, db):
    r = await api.post("/v1/track", json=ev(), headers=basic("second-key"))
    assert r.status_code == 200, r.text
    r = await api.post("/v1/track", json={**ev(2), "writeKey": "second-key"})
    assert r.status_code == 200, r.text
    assert await count(db) == 2


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
async def test_wrong_key_is_401(api, db, path):
    body = ev() if path == "/v1/track" else {"batch": [ev()]}
    r = await api.post(path, json=body, headers=basic("nope"))
    assert_error(r, 401, "unauthorized")
    r = await api.post(path, json={**body, "writeKey": "nope"})
    assert_error(r, 401, "unauthorized")
    assert await count(db) == 0


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
async def test_missing_key_is_401(api, db, path):
    body = ev() if path == "/v1/track" else {"batch": [ev()]}
    r = await api.post(path, json=body)
    assert_error(r, 401, "unauthorized", "write key")
    assert await count(db) == 0


async def test_admin_key_is_not_a_write_key(api, db):
    # A valid key without the `ingest` scope (api/scopes.py: the admin key has every other).
    r = await api.post("/v1/track", json=ev(), headers=basic(ADMIN_KEY))
    assert_error(r, 403, "forbidden", "ingest")
    r = await api.post("/v1/track", json={**ev(), "writeKey": ADMIN_KEY})
    assert_error(r, 403, "forbidden", "ingest")
    r = await api.post("/v1/track", json=ev(), headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert_error(r, 403, "forbidden", "ingest")
    assert await count(db) == 0


# -- encodings -------------------------------------------------------------------------


async def test_gzip_batch_is_accepted(api, db):
    body = gzip.compress(compact({"batch": [ev(1), ev(2)]}))
    r = await api.post(
        "/v1/batch",
        content=body,
        auth=WRITE,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == OK
    assert await count(db) == 2


async def test_gzip_track_is_accepted_with_write_key_in_body(api, db):
    body = gzip.compress(compact({**ev(), "writeKey": WRITE_KEY}))
    r = await api.post(
        "/v1/track",
        content=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == OK
    assert await count(db) == 1


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
async def test_corrupt_gzip_is_400(api, db, path):
    r = await api.post(
        path,
        content=b"this is not gzip at all",
        auth=WRITE,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert_error(r, 400, "invalid_request", "gzip")
    assert await count(db) == 0


async def test_truncated_gzip_is_400(api, db):
    whole = gzip.compress(compact({"batch": [ev(i) for i in range(50)]}))
    r = await api.post(
        "/v1/batch",
        content=whole[: len(whole) // 2],
        auth=WRITE,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"code", "message"}
    assert await count(db) == 0


@pytest.mark.parametrize("path", ["/v1/track", "/v1/batch"])
async def test_invalid_json_is_400(api, db, path):
    r = await api.post(
        path,
        content=b'{"userId": "u", "event": ',
        auth=WRITE,
        headers={"Content-Type": "application/json"},
    )
    assert_error(r, 400, "invalid_json")
    assert await count(db) == 0


async def test_nan_is_not_json(api, db):
    """Python's json module accepts NaN; JSON (and PostgreSQL jsonb) do not."""
    raw = b'{"userId": "u", "event": "e", "properties": {"x": NaN}}'
    r = await api.post(
        "/v1/track", content=raw, auth=WRITE, headers={"Content-Type": "application/json"}
    )
    assert_error(r, 400, "invalid_json")
    assert await count(db) == 0


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["track", "identify", "page", "screen", "group"])
async def test_missing_user_and_anonymous_id_is_400(api, db, kind):
    body = {k: v for k, v in SINGLE[kind].items() if k not in ("userId", "anonymousId")}
    r = await post(api, f"/v1/{kind}", body)
    assert_error(r, 400, "invalid_event", "userId")
    assert await count(db) == 0


async def test_batch_item_without_ids_is_named(api, db):
    second = {"type": "track", "event": "e", "messageId": "m2"}
    r = await post(api, "/v1/batch", {"batch": [ev(1), second]})
    msg = assert_error(r, 400, "invalid_event", "batch[1].userId")
    assert "batch[0]" not in msg
    assert await count(db) == 0


async def test_alias_without_previous_id_is_400(api, db):
    r = await post(api, "/v1/alias", {"userId": "u1"})
    assert_error(r, 400, "invalid_event", "previousId")
    assert await count(db) == 0


async def test_track_without_event_is_400(api, db):
    r = await post(api, "/v1/track", {"userId": "u1"})
    assert_error(r, 400, "invalid_event", "event")
    r = await post(api, "/v1/track", {"userId": "u1", "event": "  "})
    assert_error(r, 400, "invalid_event", "event")
    assert await count(db) == 0


@pytest.mark.parametrize("value", [[1, 2], "text", 3])
async def test_properties_not_an_object_is_400(api, db, value):
    r = await post(api, "/v1/track", {"userId": "u1", "event": "e", "properties": value})
    assert_error(r, 400, "invalid_event", "properties")
    assert await count(db) == 0


@pytest.mark.parametrize("value", ["yesterday", "2024-13-45T00:00:00Z", 1700000000])
async def test_bad_timestamp_is_400(api, db, value):
    r = await post(api, "/v1/track", {"userId": "u1", "event": "e", "timestamp": value})
    assert_error(r, 400, "invalid_event", "timestamp")
    assert await count(db) == 0


async def test_batch_item_with_unknown_type_is_named(api, db):
    r = await post(api, "/v1/batch", {"batch": [{**ev(1), "type": "purchase"}, ev(2)]})
    assert_error(r, 400, "invalid_event", "batch[0].type")
    assert await count(db) == 0


@pytest.mark.parametrize("body", [{}, {"batch": None}, {"batch": {"0": {}}}, {"batch": "x"}])
async def test_batch_missing_or_not_an_array_is_400(api, db, body):
    r = await post(api, "/v1/batch", body)
    assert_error(r, 400, "invalid_event", "batch")
    assert await count(db) == 0


async def test_batch_body_not_an_object_is_400(api, db):
    r = await post(api, "/v1/batch", [ev()])
    assert_error(r, 400, "invalid_event", "body")
    assert await count(db) == 0


# -- limits ----------------------------------------------------------------------------


async def test_single_event_over_32kb_is_400(api, db):
    body = {"userId": "u1", "event": "e", "properties": {"blob": "x" * (32 * 1024)}}
    r = await post(api, "/v1/track", body)
    assert_error(r, 400, "too_large", "32 KB")
    assert await count(db) == 0


async def test_single_event_just_under_32kb_is_accepted(api, db):
    body = {"userId": "u1", "event": "e", "properties": {"blob": ""}}
    body["properties"]["blob"] = "x" * (32 * 1024 - len(compact(body)) - 16)
    assert len(compact(body)) < 32 * 1024
    r = await api.post(
        "/v1/track", content=compact(body), auth=WRITE, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 200, r.text
    assert await count(db) == 1


async def test_non_ascii_event_under_32kb_is_accepted(api, db):
    """The limit is on the bytes sent: 6,000 CJK characters are 18 KB of UTF-8."""
    body = {"userId": "u1", "event": "e", "properties": {"note": "漢" * 6000}}
    raw = json.dumps(body, ensure_ascii=False).encode()
    assert len(raw) < 20 * 1024
    r = await api.post(
        "/v1/track", content=raw, auth=WRITE, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 200, r.text
    assert await count(db) == 1


async def test_batch_body_over_500kb_is_400(api, db):
    blob = "x" * (20 * 1024)
    batch = [ev(i, properties={"blob": blob}) for i in range(26)]  # each under 32 KB
    raw = compact({"batch": batch})
    assert len(raw) > 500 * 1024
    r = await api.post(
        "/v1/batch", content=raw, auth=WRITE, headers={"Content-Type": "application/json"}
    )
    assert_error(r, 400, "too_large", "500 KB")
    assert await count(db) == 0


async def test_gzip_batch_over_500kb_uncompressed_is_400(api, db):
    batch = [ev(i, properties={"blob": "x" * (20 * 1024)}) for i in range(26)]
    raw = gzip.compress(compact({"batch": batch}))
    assert len(raw) < 500 * 1024
    r = await api.post(
        "/v1/batch",
        content=raw,
        auth=WRITE,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert_error(r, 400, "too_large", "500 KB")
    assert await count(db) == 0


async def test_batch_of_2501_events_is_400(api, db):
    batch = [ev(i) for i in range(2501)]
    assert len(compact({"batch": batch})) < 500 * 1024
    r = await post(api, "/v1/batch", {"batch": batch})
    assert_error(r, 400, "invalid_event", "batch", "2501", "2500")
    assert await count(db) == 0


async def test_batch_of_exactly_2500_events_is_stored(api, db):
    batch = [ev(i) for i in range(2500)]
    assert len(compact({"batch": batch})) < 500 * 1024
    r = await post(api, "/v1/batch", {"batch": batch})
    assert r.status_code == 200, r.text
    assert r.json() == OK
    assert await count(db) == 2500


async def test_batch_event_over_32kb_is_named(api, db):
    batch = [ev(0), ev(1), ev(2, properties={"blob": "x" * (33 * 1024)}), ev(3)]
    assert len(compact({"batch": batch})) < 500 * 1024
    r = await post(api, "/v1/batch", {"batch": batch})
    msg = assert_error(r, 400, "invalid_event", "batch[2]", "32 KB")
    assert "batch[0]" not in msg and "batch[1]" not in msg
    assert await count(db) == 0


# -- all or nothing --------------------------------------------------------------------


async def test_rejected_batch_stores_none_of_its_valid_events(api, db):
    batch = [ev(1), ev(2), {"type": "track", "userId": "u", "messageId": "m3"}, ev(4)]
    r = await post(api, "/v1/batch", {"batch": batch})
    assert_error(r, 400, "invalid_event", "batch[2].event")
    assert await count(db) == 0


async def test_earlier_event_survives_a_rejected_request(api, db):
    r = await post(api, "/v1/track", ev(1))
    assert r.status_code == 200
    r = await post(api, "/v1/batch", {"batch": [ev(2), {**ev(3), "type": "nope"}]})
    assert_error(r, 400, "invalid_event", "batch[1].type")
    r = await post(api, "/v1/track", {"event": "e"})
    assert_error(r, 400, "invalid_event", "userId")
    assert await db.fetchval("SELECT array_agg(message_id) FROM events") == ["m1"]


# -- storage ---------------------------------------------------------------------------


async def test_same_message_id_in_two_requests_is_one_row(api, db):
    for _ in range(2):
        r = await post(api, "/v1/track", ev(7, properties={"n": 1}))
        assert r.status_code == 200
        assert r.json() == OK
    r = await post(api, "/v1/batch", {"batch": [ev(7)]})
    assert r.status_code == 200
    assert await db.fetchval("SELECT count(*) FROM events WHERE message_id = 'm7'") == 1
    assert await count(db) == 1


async def test_same_message_id_twice_in_one_batch_is_one_row(api, db):
    r = await post(api, "/v1/batch", {"batch": [ev(1), ev(8), ev(8), ev(2)]})
    assert r.status_code == 200, r.text
    assert r.json() == OK
    assert await db.fetchval("SELECT count(*) FROM events WHERE message_id = 'm8'") == 1
    assert await count(db) == 3


async def test_timestamp_comes_from_the_payload(api, db):
    r = await post(api, "/v1/track", ev(1, timestamp="2012-12-02T00:30:12.984Z"))
    assert r.status_code == 200
    ts = await db.fetchval("SELECT timestamp FROM events WHERE message_id = 'm1'")
    assert ts == datetime(2012, 12, 2, 0, 30, 12, 984000, tzinfo=UTC)


async def test_original_timestamp_is_the_fallback(api, db):
    r = await post(
        api,
        "/v1/batch",
        {
            "batch": [
                ev(1, originalTimestamp="2020-05-06T07:08:09+02:00"),
                ev(2, timestamp="2021-01-01T00:00:00Z", originalTimestamp="2020-01-01T00:00:00Z"),
            ]
        },
    )
    assert r.status_code == 200, r.text
    rows = {
        r["message_id"]: r["timestamp"]
        for r in await db.fetch("SELECT message_id, timestamp FROM events")
    }
    assert rows["m1"] == datetime(2020, 5, 6, 5, 8, 9, tzinfo=UTC)
    assert rows["m2"] == datetime(2021, 1, 1, tzinfo=UTC)


async def test_no_timestamp_means_received_now(api, db):
    before = datetime.now(UTC)
    r = await post(api, "/v1/track", ev(1))
    assert r.status_code == 200
    ts = await db.fetchval("SELECT timestamp FROM events")
    assert before <= ts <= datetime.now(UTC)


async def test_numeric_user_id_is_stored_as_a_string(api, db):
    r = await post(api, "/v1/track", {"userId": 12345, "event": "e", "messageId": "m1"})
    assert r.status_code == 200, r.text
    row = await db.fetchrow("SELECT user_id, payload FROM events")
    assert row["user_id"] == "12345"


async def test_write_key_is_not_stored(api, db):
    r = await api.post("/v1/track", json={**ev(1), "writeKey": WRITE_KEY})
    assert r.status_code == 200
    item = {**ev(2), "writeKey": WRITE_KEY}
    r = await api.post("/v1/batch", json={"batch": [item, ev(3)], "writeKey": WRITE_KEY})
    assert r.status_code == 200, r.text
    rows = await db.fetch("SELECT payload FROM events")
    assert len(rows) == 3
    for row in rows:
        assert "writeKey" not in row["payload"]
        assert WRITE_KEY not in json.dumps(row["payload"])


async def test_long_event_name_is_a_validation_error_not_a_crash(api, db):
    """A 600-character event name (far under 32 KB) is named in a 400, not a crash."""
    r = await post(api, "/v1/track", {"userId": "u1", "event": "E" * 600, "messageId": "m1"})
    assert_error(r, 400, "invalid_event", "event")
    assert await count(db) == 0
    r = await post(api, "/v1/track", {"userId": "u" * 513, "event": "e", "messageId": "m1"})
    assert_error(r, 400, "invalid_event", "userId")
    assert await count(db) == 0


@pytest.mark.parametrize(
    "body",
    [
        {"userId": "u1", "event": "Nul\u0000Name", "messageId": "m1"},
        {"userId": "u1", "event": "e", "properties": {"note": "a\u0000b"}, "messageId": "m1"},
    ],
    ids=["event", "properties"],
)
async def test_nul_character_is_a_validation_error_not_a_crash(api, db, body):
    """`\\u0000` is valid JSON but PostgreSQL text and jsonb cannot hold it."""
    r = await post(api, "/v1/track", body)
    field = "properties" if "properties" in body else "event"
    assert_error(r, 400, "invalid_event", field)
    assert await count(db) == 0
    # The escaped text `\\u0000` (a backslash, not NUL) is ordinary data.
    ok = {"userId": "u1", "event": "e", "properties": {"note": "\\u0000"}, "messageId": "m2"}
    assert (await post(api, "/v1/track", ok)).status_code == 200


async def test_non_ascii_keys_are_refused_not_crashed(api):
    """A header can carry any byte; a key that is not ours is a 401, never a 500."""
    basic = "Basic " + base64.b64encode("clé:".encode()).decode()
    r = await api.post("/v1/track", json={"userId": "u", "event": "E"},
                       headers={"Authorization": basic})  # fmt: skip
    assert r.status_code == 401
    r = await api.get("/v1/journeys", headers={"Authorization": "Bearer clé".encode("latin-1")})
    assert r.status_code == 401
