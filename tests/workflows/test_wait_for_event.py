"""After a `wait_for`, conditions and templates read the event that came as `trigger` and as
`results.<step>.event`; `event` stays the entry event. Time-skipping server, real Postgres."""

from __future__ import annotations

from typing import Any

from models.context import EVENT, result_shape
from models.runtime import RunSummary
from tests.harness import engine, track
from tests.receiver import Receiver
from workflows.journey import JourneyWorkflow


def _when(path: str, op: str, value: Any) -> dict[str, Any]:
    return {"path": path, "op": op, "value": value}


SURVEY: dict[str, Any] = {
    "id": "survey",
    "name": "Survey",
    "entry": {"event": "Survey Sent",
              "conditions": {"path": "event.properties.survey", "op": "exists"}},
    "steps": [
        {"id": "ask", "kind": "wait_for", "timeout": "3d", "on_timeout": "end", "events": [
            {"event": "Survey Answered",
             "conditions": {"path": "event.properties.score", "op": "exists"}}]},
        {"id": "route", "kind": "branch", "else": "detractor", "cases": [
            {"when": _when("trigger.properties.score", "gte", 9), "next": "confirm"}]},
        {"id": "confirm", "kind": "branch", "else": "wrong", "cases": [
            {"when": _when("results.ask.event.properties.score", "gte", 9), "next": "thanks"}]},
        {"id": "thanks", "kind": "send", "next": "comment", "template": {
            "subject": "{{ event.event }}",
            "body": "Thanks for the {{ trigger.properties.score }} "
                    "({{ results.ask.event.properties.score }}) on {{ event.properties.survey }}"}},
        {"id": "comment", "kind": "wait_for", "timeout": "1d", "on_timeout": "end",
         "since": "entry", "events": [{"event": "Survey Commented"}]},
        {"id": "echo", "kind": "send", "next": "end", "template": {
            "body": "You said {{ trigger.properties.text }}; "
                    "score was {{ results.ask.event.properties.score }}"}},
        {"id": "detractor", "kind": "send", "next": "end",
         "template": {"body": "Sorry about the {{ trigger.properties.score }}"}},
        {"id": "wrong", "kind": "exit", "reason": "read the entry event"},
    ],
}  # fmt: skip


def _keys_within(value: dict[str, Any], shape: Any, label: str) -> None:
    """What a run stored has only fields models.context declares (the validator's source)."""
    if shape.fields is None:
        return
    for key, inner in value.items():
        assert key in shape.fields, f"{label}.{key} is not declared in models.context"
        if isinstance(inner, dict):
            _keys_within(inner, shape.fields[key], f"{label}.{key}")


async def test_branches_and_templates_read_the_answer_not_the_entry(db, ts_env):
    async with engine(db, ts_env) as eng:
        await eng.publish(SURVEY)
        await eng.send(
            track("p", "Survey Sent", survey="q4"), track("d", "Survey Sent", survey="q4")
        )
        promoter, detractor = await eng.run("survey", "p"), await eng.run("survey", "d")
        await eng.send(
            track("p", "Survey Answered", score=10),
            track("d", "Survey Answered", score=3),
            track("p", "Survey Commented", text="great"),
        )

        result = await eng.result(promoter)
        assert (result.status, result.steps) == (
            "completed",
            ["ask", "route", "confirm", "thanks", "comment", "echo"],
        )
        assert [(m["subject"], m["body"], m["status"]) for m in await eng.messages("p")] == [
            ("Survey Sent", "Thanks for the 10 (10) on q4", "sent"),
            (None, "You said great; score was 10", "sent"),
        ]
        summary: RunSummary = await promoter.query(JourneyWorkflow.summary)
        assert summary.results["ask"]["event"]["properties"] == {"score": 10}
        assert summary.results["comment"]["event"]["event"] == "Survey Commented"
        for step in ("ask", "comment", "thanks", "echo"):
            kind = "send" if step in ("thanks", "echo") else "wait_for"
            _keys_within(summary.results[step], result_shape(kind), f"results.{step}")
        _keys_within(summary.results["ask"]["event"], EVENT, "results.ask.event")

        result = await eng.result(detractor)
        assert result.steps == ["ask", "route", "detractor"]
        assert [m["body"] for m in await eng.messages("d")] == ["Sorry about the 3"]


def _after_answer(url: str) -> dict[str, Any]:
    return {
        "id": "survey_hook", "name": "Survey hook",
        "entry": {"event": "Survey Sent"},
        "steps": [
            {"id": "ask", "kind": "wait_for", "timeout": "3d", "on_timeout": "end", "events": [
                {"event": "Survey Answered"}]},
            {"id": "crm", "kind": "webhook", "url": url, "payload": {
                "score": "{{ trigger.properties.score }}",
                "answered": "{{ results.ask.event.event }} {{ results.ask.outcome }}",
                "journey": "{{ journey.id }} v{{ journey.version }}"}},
            {"id": "agent", "kind": "handoff", "queue": "nps",
             "title": "Call about {{ trigger.properties.score }} ({{ results.crm.status }})",
             "details": {"entry": "{{ event.event }}"}},
        ],
    }  # fmt: skip


async def test_webhook_and_handoff_templates_read_trigger_and_results(db, ts_env, receiver):
    async with engine(db, ts_env) as eng:
        version = await eng.publish(_after_answer(f"{receiver}/ok"))
        await eng.send(track("h", "Survey Sent"))
        handle = await eng.run("survey_hook", "h")
        await eng.send(track("h", "Survey Answered", score=4))
        result = await eng.result(handle)
        assert result.steps == ["ask", "crm", "agent"]
        (call,) = Receiver.calls
        assert call["body"] == {
            "score": "4",
            "answered": "Survey Answered events[0]",
            "journey": f"survey_hook v{version}",
        }
        task = await db.fetchrow("SELECT title, details FROM tasks")
        assert (task["title"], task["details"]) == ("Call about 4 (200)", {"entry": "Survey Sent"})
