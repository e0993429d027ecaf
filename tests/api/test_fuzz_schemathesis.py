"""Schemathesis against the app's own `/openapi.json`: every operation, valid auth for both
kinds of key, a fixed number of examples each, derandomized (same cases every run).

The contract checked: no answer is a 5xx, and every 4xx is `{"code": ..., "message": ...}`.
Server errors it found (and that are now fixed and pinned in test_hostile_input.py): integers
past int64/int32 in paths and queries, NUL in paths, queries and bodies, lone surrogates and
1e400 in bodies, deep nesting, 9999/0001 timestamps, and journeys too long for the recursive
cycle check.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from core.logs import get_logger
from tests.api.conftest import ADMIN_KEY, WRITE, WRITE_KEY
from tests.api.live_server import live_api
from tests.harness import engine

log = get_logger("tests.fuzz")
EXAMPLES = 12  # per operation: ~60 operations, well under a minute
AUTH = {
    "writeKey": requests.auth._basic_auth_str(WRITE_KEY, ""),
    "adminKey": f"Bearer {ADMIN_KEY}",
}


def fuzz(base_url: str) -> list[str]:
    """Every operation, EXAMPLES cases each; the failures, described (empty: none)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    session = requests.Session()
    failures: list[str] = []
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        security = operation.definition.raw.get("security") or [{}]
        auth = next((AUTH[k] for k in security[0] if k in AUTH), None)
        headers = {"Authorization": auth} if auth else {}
        _fuzz_operation(operation, base_url, session, headers, failures, statuses)
    log.info("fuzz.statuses", statuses=statuses)
    return failures


def _fuzz_operation(
    operation: Any,
    base_url: str,
    session: requests.Session,
    headers: dict[str, str],
    failures: list[str],
    statuses: dict[int, int],
) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        where = f"{case.method} {case.formatted_path} -> {response.status_code}"
        # A 503 that the operation documents is its answer, not a fault (GET /health with no
        # worker polling: this test runs none).
        documented = response.status_code == 503 and "503" in operation.definition.raw.get(
            "responses", {}
        )
        if documented:
            return  # with the body the operation documents for it
        if response.status_code >= 500:
            failures.append(f"{where}: {response.text[:300]}")
        elif response.status_code >= 400:
            try:
                body = response.json()
            except json.JSONDecodeError:
                body = None
            if not (
                isinstance(body, dict)
                and set(body) == {"code", "message"}
                and all(isinstance(v, str) and v for v in body.values())
            ):
                failures.append(f"{where}: not {{code, message}}: {response.text[:300]}")

    check()


async def test_fuzzing_every_operation_finds_no_server_error(db, settings):
    async with live_api(settings) as url:
        failures = await asyncio.to_thread(fuzz, url)
    assert failures == [], "\n".join(failures)


# -- hostile values inside otherwise valid events ----------------------------------------

FUZZ_JOURNEY = {
    "id": "fuzz_journey",
    "name": "Fuzz",
    "entry": {"type": "track", "event": "Good"},
    "steps": [{"id": "hold", "kind": "wait", "duration": "1d"}],
}
_strings = st.sampled_from(['"\\ud800"', '"a\\udfffb"', '"a\\u0000b"', '"\\u0000"', '"ok"'])
_numbers = st.one_of(
    st.sampled_from(["1e400", "-1e400", "1e308", "123456789012345678901234567890", "-0.0"]),
    st.integers().map(str),
)
_times = st.one_of(
    st.datetimes().map(lambda d: json.dumps(d.isoformat() + "Z")),
    st.sampled_from(['"0001-01-01T00:00:00+14:00"', '"9999-12-31T23:59:59.999999Z"']),
)
_nested = st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "1" + "]" * n)
_keys = st.sampled_from(['{"\\ud800": 1}', '{"a\\u0000": 1}', '{"k": 1}'])
# (where in the event, raw JSON for the value)
HOSTILE = st.one_of(
    st.tuples(st.sampled_from(["properties", "context", "traits"]), _strings | _numbers | _keys),
    st.tuples(st.sampled_from(["properties", "integrations"]), _nested),
    st.tuples(st.sampled_from(["timestamp", "originalTimestamp", "sentAt", "receivedAt"]), _times),
    st.tuples(st.sampled_from(["userId", "event", "messageId"]), _strings),
)


def hostile_event(where: str, value: str, n: int) -> bytes:
    fields = {"type": '"track"', "userId": '"hostile"', "event": '"Good"'}
    fields["messageId"] = f'"hostile-{n}"'
    if where in ("properties", "context", "traits", "integrations"):
        fields[where] = f'{{"x": {value}}}' if not value.startswith("{") else value
    else:
        fields[where] = value
    return ("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}").encode()


async def test_hostile_values_never_block_good_events(db, api, dev_env):
    """Every answer to a hostile event is 200 or a 4xx; good events sent alongside (their own
    requests, as a client's next batch) are stored, routed, reach the profile and journey."""
    loop = asyncio.get_running_loop()
    answers: dict[int, int] = {}
    sent: list[int] = []

    def post(path: str, raw: bytes) -> int:
        call = api.post(path, content=raw, auth=WRITE, headers={"Content-Type": "application/json"})
        return asyncio.run_coroutine_threadsafe(call, loop).result().status_code

    @given(hostile=HOSTILE, single=st.booleans())
    @settings(max_examples=60, derandomize=True, database=None, deadline=None)
    def check(hostile: tuple[str, str], single: bool) -> None:
        n = len(sent)
        event = hostile_event(*hostile, n)
        status = (
            post("/v1/track", event) if single else post("/v1/batch", b'{"batch": [%s]}' % event)
        )
        answers[status] = answers.get(status, 0) + 1
        assert status == 200 or 400 <= status < 500, (hostile, status)
        good = [
            {"type": "identify", "userId": f"good-{n}", "traits": {"n": n}, "messageId": f"gi-{n}"},
            {"type": "track", "userId": f"good-{n}", "event": "Good", "messageId": f"gt-{n}"},
        ]
        assert post("/v1/batch", json.dumps({"batch": good}).encode()) == 200
        sent.append(n)

    async with engine(db, dev_env) as eng:
        await eng.publish(FUZZ_JOURNEY)
        await asyncio.to_thread(check)
        while await eng.router.route_once():
            pass
        assert await db.fetchval("SELECT count(*) FROM events WHERE routed_at IS NULL") == 0
        for n in sent:
            cid = await eng.customer(f"good-{n}")
            assert await db.fetchval("SELECT traits FROM customers WHERE id = $1", cid) == {"n": n}
            run = await db.fetchval(
                "SELECT status FROM journey_runs WHERE customer_id = $1 AND journey_id = $2",
                cid,
                FUZZ_JOURNEY["id"],
            )
            assert run in ("running", "starting"), (n, run)
    assert 200 in answers and 400 in answers, answers  # both kinds were exercised
