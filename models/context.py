"""What a running journey lets conditions and templates read, declared once.

Every name a condition path or a template starts with, and below it the fields where their
shape is known: `customer`, `journey` and the event envelope (`event`, `entry`, `trigger`) are
fixed; `profile` traits, event `properties` / `traits` and a webhook's answer are free-form;
`results.<step>` has the fields its step kind stores (RESULT_SHAPES). Publish-time validation
(`models.validation`) refuses a field that is not declared here, naming the nearest one that is,
so `{{ customer.id }}` is an error at publish instead of a failed send at run time.

The values are built by the workflow (`workflows.journey.JourneyWorkflow.context`, the step
handlers in `workflows.steps`, which store `results`) and by the activities that render
(`activities.journey_activities.template_context`). A step handler that stores a new key in its
results declares it in RESULT_SHAPES in the same change; the README's context table is this
module in prose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shape:
    """One value in the context.

    `fields` set: a record whose keys are known (anything else is refused). `each` set: a
    mapping keyed by data (event names), every value of shape `each`. `value`: a scalar (a
    condition path cannot go below it; a template may call its methods). None of them:
    free-form data, any key at any depth. `aliases` map a likely wrong key to the right one
    (`id` → `customer_id`); `spill` is the free-form field an unknown key probably belongs in
    (`event.score` → `event.properties.score`); `notes` say where a likely key lives instead
    when that is outside this value (`event.userId`: the customer is `customer.customer_id`).
    """

    doc: str = ""
    fields: Mapping[str, Shape] | None = None
    each: Shape | None = None
    value: bool = False
    aliases: Mapping[str, str] = field(default_factory=dict)
    spill: str | None = None
    notes: Mapping[str, str] = field(default_factory=dict)

    @property
    def free(self) -> bool:
        return self.fields is None and self.each is None and not self.value


def value(doc: str) -> Shape:
    return Shape(doc, value=True)


def free(doc: str) -> Shape:
    return Shape(doc)


def record(
    doc: str,
    fields: Mapping[str, Shape],
    *,
    aliases: Mapping[str, str] | None = None,
    spill: str | None = None,
    notes: Mapping[str, str] | None = None,
) -> Shape:
    return Shape(doc, fields=fields, aliases=aliases or {}, spill=spill, notes=notes or {})


_WHO = "the customer is customer.customer_id in templates, profile.customer_id in a branch"


EVENT = record(
    "an event: the envelope of a Segment call as a journey sees it",
    {
        "type": value("track, identify, page, screen, group, alias; enroll (API, launches)"),
        "event": value("the track event's name, e.g. Survey Answered"),
        "properties": free("the event's properties (free-form); an enrollment's context"),
        "traits": free("the traits sent with the event (free-form)"),
        "timestamp": value("ISO-8601, as corrected by the API"),
        "message_id": value("the Segment messageId"),
    },
    aliases={
        "name": "event",
        "id": "message_id",
        "messageId": "message_id",
        "props": "properties",
        "context": "properties",
    },
    spill="properties",
    notes={k: _WHO for k in ("customer_id", "userId", "user_id", "anonymousId")},
)

CUSTOMER = record(
    "the customer the run is for",
    {
        "customer_id": value("our customer id (not the Segment userId)"),
        "traits": free("the profile's traits (free-form)"),
        "stats": record("figures about the customer", {"timezone": value("IANA name or null")}),
    },
    aliases={"id": "customer_id", "userId": "customer_id", "timezone": "stats.timezone"},
    spill="traits",
)

JOURNEY = record(
    "the journey the run follows",
    {"id": value("the journey id"), "version": value("the version the run entered")},
    aliases={"journey_id": "id"},
)

PROFILE_TRAITS = free("the customer's traits (free-form)")

# `profile` in a branch condition: the profile loaded when the branch runs.
PROFILE = record(
    "the customer's profile, loaded when a branch runs",
    {
        "customer_id": value("our customer id"),
        "traits": free("the profile's traits (free-form)"),
        "stats": record(
            "figures from the customer's events",
            {
                "events": Shape("event counts by name", each=value("how many")),
                "last_seen": Shape("last time by event name", each=value("ISO-8601")),
                "total_events": value("all events"),
                "timezone": value("IANA name or null"),
            },
            aliases={"counts": "events"},
        ),
    },
    aliases={"id": "customer_id"},
    spill="traits",
)

# `profile` in a wait's `until` path (activities.waits): the traits only.
PROFILE_FOR_WAIT = record(
    "the customer's traits", {"traits": free("the traits (free-form)")}, spill="traits"
)

_SKIPPED = {
    "outcome": value("skipped, when an operator skipped the wait"),
    "reason": value("the operator's reason"),
}

# What each step kind stores in `results.<step id>` (workflows/steps.py). A kind not listed
# stores nothing. `score` depends on the model (SCORE_SHAPES).
RESULT_SHAPES: dict[str, Shape] = {
    "wait": record(
        "a wait with `at` or `until`",
        {
            "until": value("when the wait ends, ISO-8601 (null: no date)"),
            "note": value("why there was no date"),
            **_SKIPPED,
        },
    ),
    "wait_for": record(
        "which event came, or the timeout",
        {
            "outcome": value("events[<i>] (the matched entry of `events`), timeout, or skipped"),
            "event": EVENT,
            "reason": value("the operator's reason, when skipped"),
        },
        aliases={"matched": "event", "answer": "event", "status": "outcome", "result": "outcome"},
        spill="event",
    ),
    "send": record(
        "the message",
        {
            "status": value("sent, failed, skipped, bounced, holdout"),
            "message_id": value("the stored message's id"),
            "channel": value("the channel it went out on"),
            "reason": value("why skipped: no_address, no_consent, suppressed, capped, …"),
            "error": value("why failed (a template error)"),
            "quiet_until": value("end of the quiet hours it met, ISO-8601"),
        },
    ),
    "split": record("the arm", {"arm": value("the arm's name")}, aliases={"group": "arm"}),
    "holdout": record(
        "control or treatment",
        {"holdout": value("true: the customer is in the control group (no sends)")},
        aliases={"group": "holdout", "arm": "holdout", "control": "holdout"},
    ),
    "score": record(
        "the model's score", {"model": value("model name"), "score": value("the score")}
    ),
    "webhook": record(
        "the answer",
        {
            "status": value("HTTP status (null: no answer)"),
            "ok": value("true for a 2xx"),
            "body": free("the answer's JSON body (free-form)"),
            "error": value("why it failed, when retries ran out"),
        },
        aliases={"status_code": "status", "code": "status", "response": "body", "json": "body"},
    ),
    "handoff": record(
        "the task",
        {
            "task_id": value("the task's id"),
            "queue": value("the queue"),
            "outcome": value("the outcome it was closed with, or timeout"),
            "notify": record(
                "how notify_url answered",
                {
                    "ok": value("true unless the notification failed"),
                    "status": value("HTTP status"),
                    "error": value("why it failed"),
                },
            ),
        },
        aliases={"task": "task_id", "id": "task_id"},
    ),
}

# The `rfm` model's details (activities.scoring.RfmModel) beside `model` and `score`.
SCORE_SHAPES: dict[str, Shape] = {
    "rfm": record(
        "RFM score, 3..15",
        {
            "model": value("rfm"),
            "score": value("R + F + M, 3..15"),
            "recency_days": value("days since the last order (null: none)"),
            "orders": value("Order Completed count"),
            "revenue": value("sum of revenue / total"),
            "r": value("recency band 1..5"),
            "f": value("frequency band 1..5"),
            "m": value("monetary band 1..5"),
        },
    )
}

# `results.goal`, once the journey's goal was reached (workflows.journey `_drain`).
GOAL_RESULT = record("the goal", {"at": value("when, ISO-8601"), "event": EVENT}, spill="event")


def result_shape(kind: str, model: str | None = None) -> Shape | None:
    """What a step of `kind` stores (None: nothing); `model` for a score step."""
    if kind == "score" and model is not None:
        return SCORE_SHAPES.get(model, RESULT_SHAPES["score"])
    return RESULT_SHAPES.get(kind)


TEMPLATE_VARIABLES: dict[str, Shape | None] = {
    "profile": PROFILE_TRAITS,
    "customer": CUSTOMER,
    "event": EVENT,  # the entry event
    "trigger": EVENT,
    "journey": JOURNEY,
    "results": None,  # by step: see models.validation
}
