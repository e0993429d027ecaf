"""Publish-time checks of what conditions and templates read (models.context): a field that
cannot exist at run time is refused at publish, with the field it was probably meant to be.
Fast: no servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models.validation import check_template_sources, warnings
from store.journeys import DefinitionError, load_file, parse_definition

SURVEY_ENTRY = {
    "event": "Survey Sent",
    "conditions": {"path": "event.properties.survey", "op": "exists"},
}


def _defn(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "j", "name": "J", "entry": {"event": "Go"}, "steps": list(steps), **extra}


def _send(sid: str, body: str, **extra: Any) -> dict[str, Any]:
    return {"id": sid, "kind": "send", "template": {"body": body}, **extra}


def _branch(sid: str, when: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": sid, "kind": "branch", "cases": [{"when": when, "next": "end"}], "else": "end",
            **extra}  # fmt: skip


def _when(path: str, op: str = "exists", **extra: Any) -> dict[str, Any]:
    return {"path": path, "op": op, **extra}


# A step of each kind that stores results, before the step that reads them.
PRODUCERS: list[dict[str, Any]] = [
    {"id": "ask", "kind": "wait_for", "timeout": "1d",
     "events": [{"event": "Survey Answered"}]},
    {"id": "later", "kind": "wait", "at": "09:00"},
    {"id": "mail", "kind": "send", "template": {"body": "hi"}},
    {"id": "ab", "kind": "split", "arms": [{"name": "A", "weight": 1}, {"name": "B", "weight": 1}]},
    {"id": "control", "kind": "holdout", "percent": 10},
    {"id": "rfm", "kind": "score", "model": "rfm"},
    {"id": "hook", "kind": "webhook", "url": "https://example.com/x"},
    {"id": "agent", "kind": "handoff", "queue": "support", "title": "call them", "wait": True,
     "timeout": "1d", "notify_url": "https://example.com/n"},
]  # fmt: skip

# (template or condition path, what the error says: the field and "did you mean" its fix)
REFUSED = {
    "customer.id": ["customer.id: no such field", "did you mean customer.customer_id?"],
    "customer.email": ["did you mean customer.traits.email?"],
    "customer.stats.events": ["customer.stats.events", "customer.stats has timezone"],
    "journey.name": ["journey.name: no such field", "journey has id, version"],
    "event.name": ["did you mean event.event?"],
    "event.propertes.score": ["did you mean event.properties?"],
    "event.score": ["did you mean event.properties.score?"],
    "event.userId": ["event.userId: no such field, the customer is customer.customer_id in "],
    "results.ask.status": ["did you mean results.ask.outcome?"],
    "trigger.prop.score": ["did you mean trigger.properties?"],
    "results.ask.evnt.properties.score": ["did you mean results.ask.event?"],
    "results.ask.event.name": ["did you mean results.ask.event.event?"],
    "results.ask.score": ["did you mean results.ask.event.properties.score?"],
    "results.later.untill": ["did you mean results.later.until?"],
    "results.mail.state": ["did you mean results.mail.status?"],
    "results.ab.group": ["did you mean results.ab.arm?"],
    "results.control.group": ["did you mean results.control.holdout?"],
    "results.rfm.scor": ["did you mean results.rfm.score?"],
    "results.rfm.frequency": ["results.rfm.frequency: no such field", "recency_days"],
    "results.hook.status_code": ["did you mean results.hook.status?"],
    "results.hook.response.id": ["did you mean results.hook.body?"],
    "results.agent.outcom": ["did you mean results.agent.outcome?"],
    "results.agent.notify.code": ["results.agent.notify.code", "notify has ok, status, error"],
    "results.ghost.x": ["results.ghost: no such step"],
}

ALLOWED_IN_BOTH = [
    "customer.customer_id",
    "customer.traits.first_name",
    "customer.stats.timezone",
    "journey.id",
    "journey.version",
    "event.properties.any.depth.at.all",
    "event.traits.email",
    "event.timestamp",
    "event.message_id",
    "trigger.properties.score",
    "trigger.event",
    "results.ask.outcome",
    "results.ask.event.properties.score",
    "results.ask.event.traits.plan",
    "results.later.until",
    "results.mail.status",
    "results.mail.channel",
    "results.ab.arm",
    "results.control.holdout",
    "results.rfm.score",
    "results.rfm.f",
    "results.rfm.recency_days",
    "results.hook.ok",
    "results.hook.status",
    "results.hook.body.customer.tier",
    "results.agent.outcome",
    "results.agent.task_id",
    "results.agent.notify.status",
]


def _template_journey(expr: str) -> dict[str, Any]:
    return _defn(*PRODUCERS, _send("reader", "x {{ " + expr + " }} y"))


def _condition_journey(path: str) -> dict[str, Any]:
    return _defn(*PRODUCERS, _branch("reader", _when(path)))


def _refused(data: dict[str, Any]) -> str:
    with pytest.raises(DefinitionError) as err:
        parse_definition(data)
    return str(err.value)


@pytest.mark.parametrize("expr", list(REFUSED))
def test_a_template_reading_an_unknown_field_is_refused_with_did_you_mean(expr: str) -> None:
    message = _refused(_template_journey(expr))
    assert "template.body (step 'reader'): " in message
    for fragment in REFUSED[expr]:
        assert fragment in message, message


@pytest.mark.parametrize(
    "path", [p for p in REFUSED if p.split(".")[0] not in ("customer", "journey")]
)
def test_a_condition_reading_an_unknown_field_is_refused_with_did_you_mean(path: str) -> None:
    message = _refused(_condition_journey(path))
    assert "cases[0].when (step 'reader'): " in message
    for fragment in REFUSED[path]:
        assert fragment in message, message


@pytest.mark.parametrize("expr", [*ALLOWED_IN_BOTH, "profile.first_name", "profile.a.b.c"])
def test_known_fields_and_free_form_data_pass_in_templates(expr: str) -> None:
    parse_definition(_template_journey(expr))


@pytest.mark.parametrize(
    "path",
    [p for p in ALLOWED_IN_BOTH if p.split(".")[0] not in ("customer", "journey")]
    + [
        "entry.properties.x",
        "profile.customer_id",
        "profile.traits.plan",
        "profile.stats.events.Order Completed",
        "profile.stats.last_seen.Order Completed",
        "profile.stats.total_events",
    ],
)
def test_known_fields_and_free_form_data_pass_in_conditions(path: str) -> None:
    parse_definition(_condition_journey(path))


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("profile.plan", "did you mean profile.traits.plan?"),
        ("profile.stats.counts.Order Completed", "did you mean profile.stats.events?"),
        ("profile.stats.orders", "profile.stats has events, last_seen, total_events, timezone"),
        ("results.ask.outcome.x", "results.ask.outcome is a single value"),
    ],
)
def test_condition_only_mistakes(path: str, fragment: str) -> None:
    assert fragment in _refused(_condition_journey(path))


def test_value_from_is_checked_like_a_path() -> None:
    when = _when("event.properties.x", "eq", value_from="entry.propertys.x")
    assert "did you mean entry.properties?" in _refused(_defn(_branch("b", when)))


def test_each_place_reads_only_what_it_has() -> None:
    profile_in_wait_for = _defn(
        {"id": "w", "kind": "wait_for", "timeout": "1d", "events": [
            {"event": "Paid", "conditions": _when("profile.traits.vip")}]},
    )  # fmt: skip
    message = _refused(profile_in_wait_for)
    assert (
        "events[0].conditions (step 'w'): profile.traits.vip: profile is not available" in message
    )
    assert "read by a branch step" in message

    entry = {**_defn(_send("s", "hi")), "entry": {"event": "Go", "conditions": _when("entry.x")}}
    assert "entry.conditions: entry.x: entry is not available" in _refused(entry)

    exit_on = _defn(_send("s", "hi"), exit_on=[{"event": "Stop", "conditions": _when("profile.x")}])
    assert "exit_on[0].conditions: profile.x: profile is not available" in _refused(exit_on)

    goal = _defn(
        *PRODUCERS,
        goal={"event": "Bought", "conditions": _when("results.hook.body.x")},
    )
    parse_definition(goal)  # any step's results, at journey level
    goal["goal"]["conditions"] = _when("results.hook.bdy")
    assert "goal.conditions: results.hook.bdy: no such field" in _refused(goal)


def test_goal_results_are_readable_when_the_journey_has_a_goal() -> None:
    data = _defn(
        {"id": "pause", "kind": "wait", "duration": "1d"},
        _send("s", "{{ results.goal.event.properties.total }} at {{ results.goal.at }}"),
        goal={"event": "Bought", "exit": False},
    )
    parse_definition(data)
    data["steps"][1]["template"]["body"] = "{{ results.goal.when }}"
    assert "results.goal.when: no such field" in _refused(data)
    del data["goal"]
    assert "results.goal: no such step" in _refused(data)


def test_correlate_and_until_paths_are_checked() -> None:
    correlate = _defn(
        {"id": "w", "kind": "wait_for", "timeout": "1d",
         "events": [{"event": "Paid", "correlate": ["property.cart_id"]}]},
    )  # fmt: skip
    assert "events[0].correlate (step 'w'): event.property: no such field" in _refused(correlate)
    correlate["steps"][0]["events"][0]["correlate"] = ["properties.cart_id"]
    parse_definition(correlate)

    until = _defn({"id": "w", "kind": "wait", "until": "profile.renewal"})
    assert (
        "until (step 'w'): profile.renewal: no such field, did you mean profile.traits.renewal?"
        in (_refused(until))
    )
    until["steps"][0]["until"] = "entry.properties.start_time"
    parse_definition(until)


def test_results_are_checked_in_every_template_of_a_step() -> None:
    webhook = {"id": "tell", "kind": "webhook", "url": "https://example.com/x",
               "payload": {"who": {"id": "{{ customer.id }}"}}}  # fmt: skip
    assert "payload.who.id (step 'tell'): customer.id: no such field" in _refused(_defn(webhook))
    handoff = {"id": "h", "kind": "handoff", "queue": "q", "title": "{{ results.ask.score }}"}
    message = _refused(_defn(PRODUCERS[0], handoff))
    assert "title (step 'h'): results.ask.score: no such field" in message
    variant = _send(
        "v", "ok", channel=["email", "sms"], variants={"sms": {"body": "{{ event.nme }}"}}
    )
    assert "variants.sms.body (step 'v'): event.nme: no such field" in _refused(_defn(variant))


def test_results_must_come_before_the_template_that_reads_them() -> None:
    data = _defn(_send("first", "{{ results.rfm.score }}"), {"id": "rfm", "kind": "score",
                                                            "model": "rfm"})  # fmt: skip
    assert "results.rfm: step 'rfm' does not come before this one" in _refused(data)
    data = _defn(
        {"id": "u", "kind": "update_profile", "set": {"a": 1}}, _send("s", "{{ results.u }}")
    )
    assert "results.u: a update_profile step produces no results" in _refused(data)
    data["steps"][1]["template"]["body"] = "{{ results.u.a }}"
    assert "results.u: a update_profile step produces no results" in _refused(data)


def test_template_constructs_that_are_not_context_reads_pass() -> None:
    sources = [
        "{% for item in event.properties.items %}{{ item.name }}{% endfor %}",
        "{% set customer = profile %}{{ customer.email }}",
        "{% macro line(event) %}{{ event.whatever }}{% endmacro %}{{ line(profile) }}",
        "{{ results[event.properties.step].x }}",
        "{{ event.event.upper() }} {{ customer.customer_id|upper }} {{ customer.traits.items() }}",
        "{{ event['properties']['a b'] }} {{ customer.get('customer_id') }}",
        "{% for x in [1] %}{{ loop.index }}{% endfor %}",
    ]
    parse_definition(_defn(*PRODUCERS, *[_send(f"s{i}", s) for i, s in enumerate(sources)]))
    assert "did you mean customer.customer_id?" in _refused(
        _defn(_send("s", "{{ customer['id'] }}"))
    )


def test_a_stored_template_may_read_trigger_but_not_results() -> None:
    check_template_sources([("body", "{{ trigger.properties.score }} {{ customer.customer_id }}")])
    with pytest.raises(ValueError, match=r"^body: customer.id: no such field, did you mean"):
        check_template_sources([("body", "{{ customer.id }}")])
    with pytest.raises(ValueError, match=r"^body: unknown template variable 'results'"):
        check_template_sources([("body", "{{ results.ask.outcome }}")])


def _survey(*after: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "survey", "name": "Survey", "entry": SURVEY_ENTRY,
        "steps": [
            {"id": "ask", "kind": "wait_for", "timeout": "3d", "events": [
                {"event": "Survey Answered",
                 "conditions": _when("event.properties.score", "exists")}]},
            *after,
        ],
    }  # fmt: skip


def test_reading_the_entry_event_for_what_the_awaited_event_carries_is_a_warning() -> None:
    entry_read = _survey(
        _branch("route", _when("event.properties.score", "gte", value=9), **{"else": "thanks"}),
        _send("thanks", "You gave {{ event.properties.score }}"),
    )
    found = warnings(parse_definition(entry_read))
    assert found == [
        "step 'route': cases[0].when reads event.properties.score, from the entry event "
        "(Survey Sent); the event wait_for 'ask' matched is trigger.properties.score "
        "(or results.ask.event.properties.score)",
        "step 'thanks': template.body reads event.properties.score, from the entry event "
        "(Survey Sent); the event wait_for 'ask' matched is trigger.properties.score "
        "(or results.ask.event.properties.score)",
    ]
    right = _survey(
        _branch("route", _when("trigger.properties.score", "gte", value=9), **{"else": "thanks"}),
        _send("thanks", "You gave {{ results.ask.event.properties.score }} for "
              "{{ event.properties.survey }}"),
    )  # fmt: skip
    assert warnings(parse_definition(right)) == []


@pytest.mark.parametrize(
    ("path", "fix"),
    [
        ("customer.traits.plan", "profile.traits.plan"),
        ("traits.plan", "profile.traits.plan"),
        ("properties.total", "event.properties.total"),
        ("result.rfm.score", "results.rfm.score"),
        ("triger.properties.score", "trigger.properties.score"),
    ],
)
def test_an_unknown_condition_root_names_the_fix(path: str, fix: str) -> None:
    assert f"(did you mean {fix}?)" in _refused(_condition_journey(path))


@pytest.mark.parametrize(
    ("name", "fix"), [("user", "customer"), ("customers", "customer"), ("answer", "trigger")]
)
def test_an_unknown_template_variable_names_the_fix(name: str, fix: str) -> None:
    message = _refused(_template_journey(f"{name}.x"))
    assert f"unknown template variable {name!r}, did you mean {fix}?" in message


def test_the_example_journeys_have_no_warnings() -> None:
    root = Path(__file__).resolve().parents[2] / "journeys"
    for path in root.glob("*.yaml"):
        assert warnings(load_file(path)) == [], path.name
