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

from core.logs import get_logger
from tests.api.conftest import ADMIN_KEY, WRITE_KEY
from tests.api.live_server import live_api

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
