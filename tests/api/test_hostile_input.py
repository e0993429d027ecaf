"""Hostile but valid input: every answer is a 4xx naming the field, never a 500.

Segment clients retry 5xx forever, so one event that crashes the API holds back its whole
batch, good events included. Found by fuzzing (tests/api/test_fuzz_schemathesis.py); each case
here is one of its findings, pinned.
"""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from models.validation import MAX_STEPS, _cycles
from tests.api.conftest import ADMIN, WRITE
from tests.api.test_events_api import assert_error, count, ev

JSON = {"Content-Type": "application/json"}


async def raw_post(api: httpx.AsyncClient, path: str, raw: bytes, **kw: Any) -> httpx.Response:
    kw.setdefault("auth", WRITE)
    return await api.post(path, content=raw, headers={**JSON, **kw.pop("headers", {})}, **kw)


def batch_with(hostile: str) -> bytes:
    """A batch of four good events with `hostile` (raw JSON text) spliced into batch[3]."""
    good = ",".join(json.dumps(ev(i)) for i in range(3))
    return f'{{"batch": [{good}, {hostile}]}}'.encode()


# -- timestamps ------------------------------------------------------------------------

EXTREME = ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z", "0001-01-01T00:00:00+14:00"]


@pytest.mark.parametrize("field", ["timestamp", "originalTimestamp", "sentAt", "receivedAt"])
@pytest.mark.parametrize("value", EXTREME)
async def test_extreme_timestamp_is_accepted_with_a_sane_time(api, db, field, value):
    """A device clock is no reason to lose a batch (SDKs drop batches answered 4xx): the event
    is stored, at the time it was received, and the client's value is kept in the payload."""
    before = datetime.now(UTC)
    r = await raw_post(api, "/v1/batch", batch_with(json.dumps(ev(3, **{field: value}))))
    assert r.status_code == 200, r.text
    assert await count(db) == 4
    row = await db.fetchrow("SELECT timestamp, payload FROM events WHERE message_id = 'm3'")
    if field in ("timestamp", "originalTimestamp"):
        assert before - timedelta(seconds=1) <= row["timestamp"] <= datetime.now(UTC)
        assert row["payload"]["originalTimestamp"] == value
    assert row["timestamp"] not in (datetime.min, datetime.max)


@pytest.mark.parametrize("value", EXTREME)
async def test_extreme_timestamp_on_a_single_event_and_batch_sent_at(api, db, value):
    r = await api.post("/v1/track", json=ev(1, timestamp=value), auth=WRITE)
    assert r.status_code == 200, r.text
    r = await api.post("/v1/batch", json={"batch": [ev(2)], "sentAt": value}, auth=WRITE)
    assert r.status_code == 200, r.text
    assert await count(db) == 2


async def test_a_skewed_device_clock_is_corrected_with_sent_at(api, db):
    """The spec's rule: timestamp = receivedAt - (sentAt - originalTimestamp), e.g. a phone
    whose clock reset to 1970 that tracked an event 30 s before it sent the batch."""
    r = await api.post(
        "/v1/batch",
        json={
            "batch": [ev(1, timestamp="1970-01-01T00:10:00Z")],
            "sentAt": "1970-01-01T00:10:30Z",
        },
        auth=WRITE,
    )
    assert r.status_code == 200, r.text
    ts = await db.fetchval("SELECT timestamp FROM events WHERE message_id = 'm1'")
    assert abs((datetime.now(UTC) - timedelta(seconds=30) - ts).total_seconds()) < 5


async def test_timestamps_inside_the_range_are_kept(api, db):
    r = await api.post(
        "/v1/batch",
        json={
            "batch": [ev(1, timestamp="2000-01-01T00:00:00Z", sentAt="2000-01-01T00:00:01Z")],
            "sentAt": "2000-01-01T14:00:02+14:00",
        },
        auth=WRITE,
    )
    assert r.status_code == 200, r.text
    assert await count(db) == 1


# -- hostile JSON at the event API -----------------------------------------------------


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


HOSTILE = {
    "surrogate_value": ('{"note": "\\ud800"}', "batch[3].properties.note"),
    "surrogate_key": ('{"\\udfff": 1}', "batch[3].properties"),
    "infinite_float": ('{"x": 1e400}', "batch[3].properties.x"),
    "huge_negative_float": ('{"x": -1e999}', "batch[3].properties.x"),
    "nul_key": ('{"a\\u0000b": 1}', "batch[3].properties"),
    "nul_value": ('{"x": ["ok", "a\\u0000b"]}', "batch[3].properties.x[1]"),
    "deep_100": (nested(100), "batch[3].properties"),
    "deep_5000": (nested(5000), "body"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_json_in_an_event_is_a_400_naming_the_field(api, db, case):
    props, field = HOSTILE[case]
    hostile = '{"type": "track", "userId": "u", "event": "e", "properties": ' + props + "}"
    r = await raw_post(api, "/v1/batch", batch_with(hostile))
    code = "invalid_json" if case == "deep_5000" else "invalid_event"
    assert_error(r, 400, code, field)
    assert await count(db) == 0
    # gzip (as Segment and RudderStack clients send) is checked the same way
    r = await raw_post(
        api, "/v1/batch", gzip.compress(batch_with(hostile)), headers={"Content-Encoding": "gzip"}
    )
    assert_error(r, 400, code, field)
    assert await count(db) == 0


async def test_hostile_values_in_ids_and_names_are_400s(api, db):
    for body, field in [
        ('{"userId": "\\ud83d", "event": "e"}', "userId"),
        ('{"userId": "u", "event": "\\udc00x"}', "event"),
        ('{"userId": "u", "event": "e", "context": {"traits": {"k": "\\u0000"}}}', "context"),
    ]:
        r = await raw_post(api, "/v1/track", body.encode())
        assert_error(r, 400, "invalid_event", field)
    assert await count(db) == 0


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinity_literals_are_refused_everywhere(api, db, literal):
    r = await raw_post(
        api, "/v1/track", f'{{"userId": "u", "event": "e", "x": {literal}}}'.encode()
    )
    assert_error(r, 400, "invalid_json", literal)
    entry = f'{{"type": "track", "event": "{literal}"}}'
    definition = f'{{"id": "j", "name": "J", "entry": {entry}, "x": {literal}}}'
    r = await api.post("/v1/journeys", content=definition.encode(), headers={**ADMIN, **JSON})
    assert_error(r, 400, "invalid_json", literal)
    r = await api.put(
        "/v1/templates/t1",
        content=f'{{"body": "hi", "subject": {literal}}}'.encode(),
        headers={**ADMIN, **JSON},
    )
    assert_error(r, 400, "invalid_json", literal)


# -- admin routes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/tasks/99999999999999999999",
        "/v1/tasks/9223372036854775808",
        "/v1/tasks/-9223372036854775809",
        "/v1/templates/t1/versions/3000000000",
        "/v1/journeys/j1/channels?version=3000000000",
        "/v1/customers/c1/events?before=9223372036854775808",
        "/v1/customers/c1/messages?before=99999999999999999999",
        "/v1/customers/c1/inbox?before=9223372036854775808",
    ],
)
async def test_integers_past_the_column_type_are_400s(api, db, path):
    r = await api.get(path, headers=ADMIN)
    assert_error(r, 400, "invalid_request")


async def test_integers_past_the_column_type_in_bodies_are_400s(api, db):
    r = await api.post("/v1/customers/c1/inbox/9223372036854775808/read", headers=ADMIN)
    assert_error(r, 400, "invalid_request", "message_id")
    r = await api.post("/v1/tasks/99999999999999999999/close", json={}, headers=ADMIN)
    assert_error(r, 400, "invalid_request", "task_id")
    body = {"from_version": 3000000000, "step_map": {"a": "b"}}
    r = await api.post("/v1/journeys/j1/migrate", json=body, headers=ADMIN)
    assert_error(r, 400, "invalid_request", "from_version")
    body = {"from_version": 1, "to_version": 3000000000, "step_map": {"a": "b"}}
    r = await api.post("/v1/journeys/j1/migrate", json=body, headers=ADMIN)
    assert_error(r, 400, "invalid_request", "to_version")
    r = await api.post(
        "/v1/templates/t1/preview", json={"customer_id": "c", "version": 2**31}, headers=ADMIN
    )
    assert_error(r, 400, "invalid_request", "version")


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("GET", "/v1/customers/a%00b", None),
        ("GET", "/v1/customers/a%00b/journeys", None),
        ("GET", "/v1/journeys/j%00", None),
        ("GET", "/v1/tasks?queue=q%00", None),
        ("POST", "/v1/templates", {"id": "t1", "channel": "email", "body": "a\u0000b"}),
        ("PUT", "/v1/templates/t1", {"body": "hi", "name": "x\u0000"}),
        ("POST", "/v1/tasks/1/close", {"outcome": "done\u0000"}),
        ("PUT", "/v1/journeys/j1/draft", {"name": "J", "x": {"y": ["\u0000"]}}),
        ("POST", "/v1/journeys", {"id": "j1", "name": "J\u0000"}),
        ("POST", "/v1/journeys/j1/enroll", {"customer": "c", "idempotency_key": "k\u0000"}),
    ],
)
async def test_nul_in_admin_input_is_a_400(api, db, method, path, body):
    r = await api.request(method, path, json=body, headers=ADMIN)
    assert_error(r, 400, "invalid_request")


async def test_lone_surrogate_in_admin_json_is_a_400(api, db):
    raw = b'{"id": "t1", "channel": "email", "body": "\\ud800"}'
    r = await api.post("/v1/templates", content=raw, headers={**ADMIN, **JSON})
    assert_error(r, 400, "invalid_request", "body")
    raw = b'{"id": "j1", "name": "J", "entry": {"\\udfff": 1}}'
    r = await api.put("/v1/journeys/j1/draft", content=raw, headers={**ADMIN, **JSON})
    assert_error(r, 400, "invalid_request", "entry")


async def test_deep_admin_json_is_a_400(api, db):
    for depth in (100, 5000):
        raw = ('{"id": "j1", "name": "J", "x": ' + nested(depth) + "}").encode()
        r = await api.put("/v1/journeys/j1/draft", content=raw, headers={**ADMIN, **JSON})
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"code", "message"}


def long_journey(n: int) -> dict[str, Any]:
    return {
        "id": "long",
        "name": "Long",
        "entry": {"type": "track", "event": "Go"},
        "steps": [{"id": f"s{i}", "kind": "wait", "duration": "1m"} for i in range(n)],
    }


def test_cycle_check_is_iterative():
    """A chain of 5,000 steps and a 5,000-step loop: no RecursionError."""
    chain = {f"s{i}": {f"s{i + 1}"} for i in range(5000)} | {"s5000": set()}
    assert _cycles(chain) == []
    loop = {f"s{i}": {f"s{(i + 1) % 5000}"} for i in range(5000)}
    [comp] = _cycles(loop)
    assert len(comp) == 5000


async def test_a_1200_step_journey_is_a_clear_400(api, db):
    r = await api.post("/v1/journeys", json=long_journey(1200), headers=ADMIN)
    assert_error(r, 400, "invalid_definition", "steps", str(MAX_STEPS))
    r = await api.put("/v1/journeys/long/draft", json=long_journey(1200), headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["valid"] is False
    assert any(str(MAX_STEPS) in e for e in r.json()["errors"])
    r = await api.post("/v1/journeys", json=long_journey(MAX_STEPS), headers=ADMIN)
    assert r.status_code == 200, r.text


# -- error shape -----------------------------------------------------------------------


async def test_405_names_the_allowed_methods(api):
    r = await api.delete("/v1/journeys", headers=ADMIN)
    assert_error(r, 405, "method_not_allowed")
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    r = await api.get("/v1/track", auth=WRITE)
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


async def test_404_and_validation_errors_have_the_error_shape(api):
    assert_error(await api.get("/nope"), 404, "not_found")
    r = await api.get("/v1/tasks/abc", headers=ADMIN)
    assert_error(r, 400, "invalid_request", "task_id")
    r = await api.post("/v1/templates", content=b"{", headers={**ADMIN, **JSON})
    assert_error(r, 400, "invalid_json")
    r = await api.post("/v1/templates", json=[1], headers=ADMIN)
    assert r.status_code == 400 and set(r.json()) == {"code", "message"}
