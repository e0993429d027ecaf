"""Definitions in the marketer's format: journeys and templates as YAML on every route that
takes one, errors with the field, the line and the column, and messages without pydantic's
internals (one message per mistake, "unknown field", "did you mean")."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import yaml

from store.journeys import DefinitionError, load_file, parse_definition
from tests.api.conftest import ADMIN
from tests.api.test_read_api import assert_error

YAML_TYPES = ["application/yaml", "text/yaml", "application/x-yaml"]

JOURNEY_YAML = """\
id: hello
name: Hello
entry:
  event: Signed Up
steps:
  - id: greet
    kind: send
    channel: email
    template:
      subject: Hi
      body: "Hello {{ profile.first_name }}"
  - id: pause
    kind: wait
    duration: 1d
"""

TEMPLATE_YAML = """\
id: welcome
name: Welcome
channel: email
subject: Welcome
body: |
  Hi {{ profile.first_name }},
  thanks for joining.
"""

# Internals of the validation library no author should read.
LEAKS = (
    *("validation error for", "tagged-union", "pydantic", "input_value", "type=", "literal["),
    *("Value error", "definition: definition", "Field required", "Extra inputs"),
)


def _yaml(kind: str = "application/yaml") -> dict[str, str]:
    return {**ADMIN, "Content-Type": kind}


def assert_plain(message: str) -> None:
    for leak in LEAKS:
        assert leak not in message, message


# -- YAML accepted ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", YAML_TYPES)
async def test_a_journey_is_published_from_yaml(api: httpx.AsyncClient, db, kind: str):
    r = await api.post("/v1/journeys", content=JOURNEY_YAML, headers=_yaml(kind))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "hello" and r.json()["current_version"] == 1
    stored = await db.fetchval(
        "SELECT definition FROM journey_versions WHERE journey_id = 'hello' AND version = 1"
    )
    assert stored["steps"][1]["duration"] == "1d"
    # The same definition as JSON is the same version (nothing changed).
    r = await api.post("/v1/journeys", json=yaml.safe_load(JOURNEY_YAML), headers=ADMIN)
    assert r.status_code == 200 and r.json()["current_version"] == 1


async def test_draft_and_validate_take_yaml(api: httpx.AsyncClient, db):
    body = JOURNEY_YAML.replace("id: hello\n", "")  # the id comes from the path
    r = await api.put("/v1/journeys/hello/draft", content=body, headers=_yaml("text/yaml"))
    assert r.status_code == 200, r.text
    assert r.json() == {"valid": True, "errors": [], "warnings": []}
    draft = (await api.get("/v1/journeys/hello/draft", headers=ADMIN)).json()
    assert draft["steps"][0]["template"]["body"] == "Hello {{ profile.first_name }}"
    r = await api.post("/v1/journeys/hello/validate", content=body, headers=_yaml())
    assert r.json() == {"valid": True, "errors": [], "warnings": []}
    broken = body.replace("duration: 1d", "duration: soon")
    r = await api.post("/v1/journeys/hello/validate", content=broken, headers=_yaml())
    [error] = r.json()["errors"]
    assert "steps[1].duration" in error and "step 'pause'" in error, error
    assert "line 13, column 5" in error, error
    # Without a body: the stored draft.
    r = await api.post("/v1/journeys/hello/validate", headers=ADMIN)
    assert r.json() == {"valid": True, "errors": [], "warnings": []}
    r = await api.post("/v1/journeys/hello/publish", headers=ADMIN)
    assert r.status_code == 200, r.text


async def test_a_template_is_created_and_updated_from_yaml(api: httpx.AsyncClient, db):
    r = await api.post("/v1/templates", content=TEMPLATE_YAML, headers=_yaml())
    assert r.status_code == 201, r.text
    assert r.json()["body"] == "Hi {{ profile.first_name }},\nthanks for joining.\n"
    update = "subject: Welcome!\nbody: Hi again\n"
    r = await api.put("/v1/templates/welcome", content=update, headers=_yaml("application/x-yaml"))
    assert r.status_code == 200, r.text
    assert r.json()["current_version"] == 2 and r.json()["subject"] == "Welcome!"


async def test_the_openapi_document_offers_yaml_bodies(api: httpx.AsyncClient):
    paths = (await api.get("/openapi.json")).json()["paths"]
    for path, method in (
        ("/v1/journeys", "post"),
        ("/v1/journeys/{journey_id}/draft", "put"),
        ("/v1/journeys/{journey_id}/validate", "post"),
        ("/v1/templates", "post"),
        ("/v1/templates/{template_id}", "put"),
    ):
        content = paths[path][method]["requestBody"]["content"]
        assert {"application/json", "application/yaml"} <= set(content), (path, content)
    template = paths["/v1/templates"]["post"]["requestBody"]["content"]["application/yaml"]
    assert {"id", "channel", "body"} <= set(template["schema"]["properties"])


async def test_other_media_types_are_415(api: httpx.AsyncClient):
    r = await api.post(
        "/v1/journeys", content=JOURNEY_YAML, headers={**ADMIN, "Content-Type": "text/plain"}
    )
    assert_error(r, 415, "unsupported_media_type", "application/yaml")


# -- errors with line and column -------------------------------------------------------


async def test_yaml_syntax_errors_give_line_and_column(api: httpx.AsyncClient, db):
    broken = JOURNEY_YAML.replace("  event: Signed Up\n", "  event: {Signed Up\n")
    r = await api.post("/v1/journeys", content=broken, headers=_yaml())
    message = assert_error(r, 400, "invalid_yaml", "line 5, column 6")
    assert "flow mapping" in message and "line 4, column 10" in message, message
    assert await db.fetchval("SELECT count(*) FROM journeys") == 0


async def test_validation_errors_of_yaml_give_the_path_line_and_column(api, db):
    broken = JOURNEY_YAML.replace("channel: email", "channel: emial").replace("1d", "soon")
    r = await api.post("/v1/journeys", content=broken, headers=_yaml())
    message = assert_error(r, 400, "invalid_definition")
    assert_plain(message)
    assert "steps[0].channel (step 'greet', line 8, column 5): must be one of: " in message
    assert "did you mean 'email'?" in message
    assert message.count("must be one of") == 1, message  # one union branch, not three
    r = await api.post("/v1/journeys", content=JOURNEY_YAML.replace("1d", "soon"), headers=_yaml())
    message = assert_error(r, 400, "invalid_definition", "steps[1].duration", "line 14, column 5")
    assert "invalid duration 'soon'" in message


async def test_validation_errors_of_json_give_the_path_line_and_column(api, db):
    definition = yaml.safe_load(JOURNEY_YAML)
    definition["steps"][0]["chanel"] = definition["steps"][0].pop("channel")
    text = json.dumps(definition, indent=2)
    r = await api.post(
        "/v1/journeys", content=text, headers={**ADMIN, "Content-Type": "application/json"}
    )
    message = assert_error(r, 400, "invalid_definition", "unknown field `chanel`")
    assert_plain(message)
    assert "did you mean `channel`?" in message and "required" not in message, message
    line = next(i for i, t in enumerate(text.splitlines(), 1) if '"chanel"' in t)
    assert f"steps[0] (step 'greet', line {line}, column 7)" in message, message


async def test_malformed_json_says_what_is_wrong(api: httpx.AsyncClient):
    text = '{\n  "id": "hello",\n  "name": "Hello"\n  "steps": []\n}'
    for path in ("/v1/journeys", "/v1/templates"):
        r = await api.post(
            path, content=text, headers={**ADMIN, "Content-Type": "application/json"}
        )
        assert_error(r, 400, "invalid_json", "Expecting ',' delimiter", "line 4 column 3")


async def test_template_errors_give_the_field_line_and_column(api: httpx.AsyncClient, db):
    r = await api.post(
        "/v1/templates", content=TEMPLATE_YAML.replace("channel: email", "channel: emial"),
        headers=_yaml(),
    )  # fmt: skip
    message = assert_error(r, 400, "invalid_request", "channel (line 3, column 1)")
    assert "did you mean 'email'?" in message
    assert_plain(message)
    r = await api.post(
        "/v1/templates", content=TEMPLATE_YAML.replace("joining.", "joining {{ user.x }}."),
        headers=_yaml(),
    )  # fmt: skip
    assert_error(r, 422, "invalid_template", "body (line 5, column 1)", "'user'")
    r = await api.post("/v1/templates", content=TEMPLATE_YAML + "colour: red\n", headers=_yaml())
    assert_error(r, 400, "invalid_request", "unknown field `colour`", "line 8, column 1")


async def test_a_template_reference_error_names_the_line(api: httpx.AsyncClient, db):
    body = JOURNEY_YAML.replace(
        '      subject: Hi\n      body: "Hello {{ profile.first_name }}"\n', "      ref: nope\n"
    )
    r = await api.post("/v1/journeys", content=body, headers=_yaml())
    assert_error(
        r, 400, "invalid_definition", "steps[0].template.ref (step 'greet', line 10, column 7)",
        "no stored template 'nope'",
    )  # fmt: skip


# -- hostile YAML ----------------------------------------------------------------------

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)

HOSTILE = {
    "billion laughs": (LAUGHS, "invalid_yaml", ["aliases", "line 2, column 8"]),
    "python tag": (
        "id: x\nname: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
        "invalid_yaml",
        ["!!python/object/apply:os.system", "not accepted", "name (line 2, column 7)"],
    ),
    "NUL": ('id: x\nname: "a\\0b"\n', "invalid_yaml", ["name (line 2, column 1)", "NUL"]),
    "lone surrogate": ('id: x\nname: "\\ud800"\n', "invalid_yaml", ["line 2", "Unicode"]),
    "NaN": ("id: x\nname: X\nmax_entries: .nan\n", "invalid_yaml", ["max_entries", "finite"]),
    "deep nesting": ("a: " + "[" * 100 + "]" * 100 + "\n", "invalid_yaml", ["nested more than"]),
    "key twice": (
        "id: x\nname: X\nname: Y\n",
        "invalid_yaml",
        ["'name' is given twice", "line 3, column 1"],
    ),
    "two documents": ("id: x\n---\nid: y\n", "invalid_yaml", ["line 2, column 1"]),
    "not a mapping": ("- a\n- b\n", "invalid_yaml", ["must be a mapping", "a list"]),
    "huge number": (
        "id: x\nmax_entries: " + "9" * 5000 + "\n",
        "invalid_yaml",
        ["max_entries", "not a valid int"],
    ),
    "binary": ("id: x\nname: !!binary aGk=\n", "invalid_yaml", ["!!binary", "not accepted"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_yaml_is_a_clear_400(api: httpx.AsyncClient, db, case: str):
    text, code, fragments = HOSTILE[case]
    for path in ("/v1/journeys", "/v1/templates"):
        r = await api.post(path, content=text, headers=_yaml())
        assert_error(r, 400, code, *fragments)
    assert await db.fetchval("SELECT count(*) FROM journeys") == 0


# -- the same words everywhere: parse_definition, load_file ------------------------------


def _defn(**step: Any) -> dict[str, Any]:
    return {"id": "j", "name": "J", "entry": {"event": "Go"}, "steps": [{"id": "a", **step}]}


def _message(data: dict[str, Any]) -> str:
    with pytest.raises(DefinitionError) as err:
        parse_definition(data)
    assert_plain(str(err.value))
    return str(err.value)


def test_one_message_per_mistake_without_library_words():
    message = _message(_defn(kind="send", channel="emial", template={"body": "x"}))
    assert message == (
        "definition: steps[0].channel (step 'a'): must be one of: outbox, email, sms, push, "
        "webhook, in_app, best (got 'emial'; did you mean 'email'?)"
    )
    message = _message(_defn(kind="send", channel=["email", "smss"], template={"body": "x"}))
    assert "steps[0].channel[1] (step 'a')" in message and "did you mean 'sms'?" in message
    assert message.count(";") == 1, message
    message = _message(_defn(kind="wiat", duration="1d"))
    assert "steps[0].kind (step 'a'): must be one of: wait, " in message
    assert "(got 'wiat'; did you mean 'wait'?)" in message
    message = _message(_defn(kind="wait", duraton="1d"))
    assert "unknown field `duraton` (did you mean `duration`?)" in message
    message = _message({**_defn(kind="wait", duration="1d"), "entry": {"type": "track"}})
    assert message == "definition: entry: a track match needs an `event` name"
    message = _message({**_defn(kind="wait", duration="1d"), "steps": [
        {"id": "a", "kind": "wait", "duration": "1d"}, {"id": "a", "kind": "exit"}]})  # fmt: skip
    assert message == "definition: steps[0] (step 'a'): duplicate step id"


def test_yaml_reads_times_and_words_as_written():
    """YAML 1.2: `10:30` is not the base-60 number 630, `no` is not false."""
    from models.definition_text import parse_yaml

    data = parse_yaml("at: 10:30\nanswer: no\nday: 2026-01-01\nn: 1e3\nm: 0x10\n").data
    assert data == {"at": "10:30", "answer": "no", "day": "2026-01-01", "n": 1000.0, "m": 16}


def test_load_file_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(JOURNEY_YAML.replace("kind: wait", "kind: wiat"))
    with pytest.raises(DefinitionError) as err:
        load_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}: steps[1].kind (step 'pause', line 13, column 5)"), message
    assert "did you mean 'wait'?" in message


async def test_the_audit_log_names_a_journey_published_as_yaml(api: httpx.AsyncClient, db):
    for name in ("Hello", "Hello again"):
        body = JOURNEY_YAML.replace("name: Hello", f"name: {name}")
        assert (await api.post("/v1/journeys", content=body, headers=_yaml())).status_code == 200
    r = await api.post("/v1/templates", content=TEMPLATE_YAML, headers=_yaml())
    assert r.status_code == 201
    r = await api.get("/v1/audit", headers=ADMIN)
    template, second, first = r.json()["items"]
    assert first["target"] == {"id": "hello"}, first
    assert (first["before_version"], first["after_version"]) == (None, 1)
    assert (second["before_version"], second["after_version"]) == (1, 2)
    assert template["target"] == {"id": "welcome"} and template["after_version"] == 1


async def test_an_audience_condition_error_is_said_plainly(api: httpx.AsyncClient, db):
    assert (
        await api.post("/v1/journeys", content=JOURNEY_YAML, headers=_yaml())
    ).status_code == 200
    audience = {"all": [{"path": "profile.traits.plan", "op": "eqq", "value": "pro"}]}
    r = await api.post("/v1/journeys/hello/launches", json={"audience": audience}, headers=ADMIN)
    message = assert_error(r, 400, "invalid_audience", "audience.all[0].op", "did you mean 'eq'?")
    assert_plain(message)


async def test_request_validation_errors_are_said_plainly(api: httpx.AsyncClient, db):
    r = await api.post("/v1/journeys/hello/enroll", json={"custmer": "u1"}, headers=ADMIN)
    message = assert_error(r, 400, "invalid_request", "missing required field `customer`")
    assert "(`custmer` is not a field: did you mean `customer`?)" in message
    assert_plain(message)
    r = await api.get("/v1/customers/u1/messages", params={"limit": "ten"}, headers=ADMIN)
    message = assert_error(r, 400, "invalid_request", "query.limit", "whole number", "'ten'")
    assert_plain(message)


def test_a_misspelt_field_is_unknown_not_missing():
    case = {"when": {"path": "event.x", "op": "exists"}, "next": "end"}
    data = _defn(kind="branch", elss="end", cases=[case])
    message = _message(data)
    assert message == (
        "definition: steps[0] (step 'a'): unknown field `elss` (did you mean `else`?)"
    ), message
