"""Publish-time validation: one test per error, each naming the step and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from store.journeys import DefinitionError, load_file, parse_definition


def _defn(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "j", "name": "J", "entry": {"event": "Go"}, "steps": list(steps), **extra}


def _send(sid: str, body: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"id": sid, "kind": "send", "template": {"body": body}, **extra}


WAIT = {"id": "pause", "kind": "wait", "duration": "1d"}

CASES = {
    "unknown step kind": (
        _defn({"id": "a", "kind": "teleport"}),
        ["step 'a'", "teleport"],
    ),
    "unknown field": (
        _defn(_send("a", colour="red")),
        ["step 'a'", "colour"],
    ),
    "goto to a missing step": (
        _defn(WAIT, {"id": "loop", "kind": "goto", "target": "nowhere", "max_iterations": 2}),
        ["step 'loop'", "target", "nowhere"],
    ),
    "branch to a missing step": (
        _defn(
            {
                "id": "b",
                "kind": "branch",
                "else": "ghost",
                "cases": [{"when": {"path": "event.event", "op": "exists"}, "next": "end"}],
            }
        ),
        ["step 'b'", "else", "ghost"],
    ),
    "missing else": (
        _defn(
            {
                "id": "b",
                "kind": "branch",
                "cases": [{"when": {"path": "event.event", "op": "exists"}, "next": "end"}],
            }
        ),
        ["step 'b'", "missing required field `else`"],
    ),
    "unreachable step": (
        _defn(_send("a", next="end"), _send("orphan")),
        ["step 'orphan'", "never be reached"],
    ),
    "loop without a wait": (
        _defn(_send("a"), {"id": "again", "kind": "goto", "target": "a", "max_iterations": 3}),
        ["loop", "no wait"],
    ),
    "unknown operator": (
        _defn(
            {
                "id": "b",
                "kind": "branch",
                "else": "end",
                "cases": [{"when": {"path": "event.x", "op": "resembles"}, "next": "end"}],
            }
        ),
        ["step 'b'", "resembles"],
    ),
    "type error in a condition": (
        _defn(
            {
                "id": "b",
                "kind": "branch",
                "else": "end",
                "cases": [{"when": {"path": "event.x", "op": "in", "value": 3}, "next": "end"}],
            }
        ),
        ["step 'b'", "needs a list"],
    ),
    "results of a missing step": (
        _defn(
            {
                "id": "b",
                "kind": "branch",
                "else": "end",
                "cases": [
                    {"when": {"path": "results.nope.score", "op": "gt", "value": 1}, "next": "end"}
                ],
            }
        ),
        ["step 'b'", "results.nope"],
    ),
    "results of a later step": (
        _defn(
            {
                "id": "b",
                "kind": "branch",
                "else": "s",
                "cases": [
                    {"when": {"path": "results.s.score", "op": "gt", "value": 1}, "next": "s"}
                ],
            },
            {"id": "s", "kind": "score", "model": "rfm"},
        ),
        ["step 'b'", "results.s", "does not come before"],
    ),
    "results of a step that produces none": (
        _defn(
            {"id": "u", "kind": "update_profile", "set": {"a": 1}},
            {
                "id": "b",
                "kind": "branch",
                "else": "end",
                "cases": [{"when": {"path": "results.u.x", "op": "exists"}, "next": "end"}],
            },
        ),
        ["step 'b'", "update_profile step produces no results"],
    ),
    "template syntax error": (
        _defn(_send("a", "Hello {{ profile.name ")),
        ["step 'a'", "template.body", "template error"],
    ),
    "unknown template variable": (
        _defn(_send("a", "Hello {{ user.name }}")),
        ["step 'a'", "template.body", "'user'"],
    ),
    "unknown model": (
        _defn({"id": "m", "kind": "score", "model": "crystal_ball"}),
        ["step 'm'", "crystal_ball"],
    ),
    "bad duration": (
        _defn({"id": "w", "kind": "wait", "duration": "soon"}),
        ["step 'w'", "duration"],
    ),
    "wait with two forms": (
        _defn({"id": "w", "kind": "wait", "duration": "1d", "at": "09:00"}),
        ["step 'w'", "exactly one of"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_invalid_definition_is_rejected_with_its_step(name: str):
    data, expected = CASES[name]
    with pytest.raises(DefinitionError) as err:
        parse_definition(data)
    for fragment in expected:
        assert fragment in str(err.value), str(err.value)


def test_valid_definition_with_a_waiting_loop_passes():
    defn = parse_definition(
        _defn(
            _send("a"),
            WAIT,
            {"id": "again", "kind": "goto", "target": "a", "max_iterations": 3},
        )
    )
    assert [s.id for s in defn.steps] == ["a", "pause", "again"]


def test_yaml_errors_name_file_and_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("id: x\nname: X\nentry: {event: Go\nsteps: []\n")
    with pytest.raises(DefinitionError) as err:
        load_file(path)
    assert str(path) in str(err.value)
    assert "line" in str(err.value)


def test_example_journeys_are_valid():
    root = Path(__file__).resolve().parents[2] / "journeys"
    assert {load_file(p).id for p in root.glob("*.yaml")} >= {"cart_recovery", "welcome_series"}
