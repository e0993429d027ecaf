"""`make dev` with a broken file in `journeys/`: the stack starts anyway, publishes the other
journeys, and reports the broken file with its line and column in one log line (no
traceback)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from core.devstack import _prepare

GOOD = """\
id: hello
name: Hello
entry:
  event: Signed Up
steps:
  - id: greet
    kind: send
    template:
      body: Hello
"""


def _reports(caplog: pytest.LogCaptureFixture) -> dict[str, dict[str, Any]]:
    """`devstack.journey_invalid` events by file."""
    out = {}
    for record in caplog.records:
        event = record.msg
        if isinstance(event, dict) and event.get("event") == "devstack.journey_invalid":
            assert record.exc_info is None and "exc_info" not in event  # no traceback
            out[event["file"]] = event
    return out


async def test_a_broken_journey_file_is_reported_and_the_others_published(
    db, pg_url: str, dev_env: WorkflowEnvironment, tmp_path: Path, caplog
):
    folder = tmp_path / "journeys"
    folder.mkdir()
    (folder / "a_syntax.yaml").write_text(GOOD.replace("event: Signed Up", "event: [Signed Up"))
    (folder / "b_good.yaml").write_text(GOOD)
    (folder / "c_invalid.yaml").write_text(GOOD.replace("kind: send", "kind: sned"))
    caplog.set_level(logging.INFO, logger="devstack")
    address = dev_env.client.service_client.config.target_host
    published = await _prepare(pg_url, address, dev_env.client.namespace, journeys=folder)
    assert published == {"hello": 1}
    assert await db.fetchval("SELECT current_version FROM journeys WHERE id = 'hello'") == 1
    reports = _reports(caplog)
    assert set(reports) == {"journeys/a_syntax.yaml", "journeys/c_invalid.yaml"}
    syntax = reports["journeys/a_syntax.yaml"]
    assert (syntax["line"], syntax["column"]) == (5, 6), syntax
    assert "flow sequence" in syntax["error"], syntax
    invalid = reports["journeys/c_invalid.yaml"]
    assert (invalid["line"], invalid["column"]) == (7, 5), invalid
    assert invalid["error"].startswith("steps[0].kind (step 'greet'): must be one of: "), invalid
    assert "did you mean 'send'?" in invalid["error"]
