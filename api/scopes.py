"""Who may call what: every route of the API and the scope it needs, in one table.

`api.access.AccessMiddleware` looks each request up here (method + FastAPI path template) and
enforces the rule before the route runs, so no route module checks keys itself. A route that is
not in this table is refused (fail closed), and `tests/api/test_scopes.py` walks the app's routes
so that a new route cannot ship without a line here. Public routes are declared as such, with the
reason they need no key.

Scopes (a key holds any set of them; none implies another):
  ingest   send events (the Segment API)
  read     read customers, journeys, templates, runs, tasks, reports
  manage   change journeys (drafts, publish, lifecycle, migrations, schedules) and templates
  operate  act on runs and customers: enroll, steer, launches, tasks, consent, suppressions, inbox
  admin    API keys, the audit log (and erasure)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["ingest", "read", "manage", "operate", "admin"]
SCOPES: tuple[Scope, ...] = ("ingest", "read", "manage", "operate", "admin")
# The bootstrap admin key (JOURNEYS_ADMIN_KEY) holds every scope but `ingest`: event payloads
# travel through SDKs and pipelines, and the admin key must never be usable there by mistake.
ADMIN_KEY_SCOPES: frozenset[Scope] = frozenset(SCOPES) - {"ingest"}
WRITE_KEY_SCOPES: frozenset[Scope] = frozenset({"ingest"})
# Scopes whose changes (any method but GET/HEAD) go to the audit log.
AUDITED: frozenset[Scope] = frozenset({"manage", "operate", "admin"})


@dataclass(frozen=True)
class Rule:
    """The access rule of one route.

    Attributes:
        scope: the scope a key needs; None = public (then `public` says why).
        public: why anyone may call it (its own signature or token, or nothing to protect).
        body_limit: True = the general request-size limit applies (MAX_REQUEST_BYTES); False =
            the route reads and limits its own body (events, provider callbacks).
        key_in_body: the key may come in the body (Segment `writeKey`); the route checks it
            then, with `api.deps.check_write_key`.
        versions: which versioned thing the audit log records before/after versions of; its
            id is the path's `<kind>_id` parameter or the body's `id`.
    """

    scope: Scope | None
    public: str = ""
    body_limit: bool = True
    key_in_body: bool = False
    versions: Literal["journeys", "templates"] | None = None


def _public(why: str, *, body_limit: bool = True) -> Rule:
    return Rule(None, public=why, body_limit=body_limit)


_INGEST = Rule("ingest", body_limit=False, key_in_body=True)
_READ = Rule("read")
_JOURNEY = Rule("manage", versions="journeys")
_TEMPLATE = Rule("manage", versions="templates")
_MANAGE = Rule("manage")
_OPERATE = Rule("operate")
_ADMIN = Rule("admin")

ROUTE_SCOPES: dict[tuple[str, str], Rule] = {
    # -- public ----------------------------------------------------------------------------
    ("GET", "/health"): _public(
        "health checks for operators and monitors: up/down and counts, no customer data"
    ),
    ("GET", "/health/live"): _public("liveness probe for load balancers, reveals nothing"),
    ("GET", "/openapi.json"): _public("API description"),
    ("GET", "/docs"): _public("API description"),
    ("GET", "/docs/oauth2-redirect"): _public("part of /docs"),
    ("GET", "/docs/assets/{name}"): _public(
        "Swagger UI / ReDoc files from an installed package (api/docs.py), fixed list"
    ),
    ("GET", "/redoc"): _public("API description"),
    ("GET", "/v1/t/o/{token}"): _public("open pixel: the signed token is the credential"),
    ("GET", "/v1/t/c/{token}"): _public("click redirect: the signed token is the credential"),
    ("GET", "/v1/unsubscribe/{token}"): _public("signed unsubscribe link (LINK_SECRET)"),
    ("POST", "/v1/unsubscribe/{token}"): _public("signed unsubscribe link (LINK_SECRET)"),
    ("POST", "/v1/providers/{channel}/events"): _public(
        "signed by PROVIDER_CALLBACK_SECRET; reads its own body", body_limit=False
    ),
    ("POST", "/v1/providers/sms/status"): _public(
        "X-Twilio-Signature; reads its own body", body_limit=False
    ),
    ("POST", "/v1/providers/sms/inbound"): _public(
        "X-Twilio-Signature; reads its own body", body_limit=False
    ),
    # -- ingest ----------------------------------------------------------------------------
    **{
        ("POST", f"/v1/{kind}"): _INGEST
        for kind in ("batch", "track", "identify", "page", "screen", "group", "alias")
    },
    # -- read ------------------------------------------------------------------------------
    ("GET", "/v1/customers"): _READ,
    ("GET", "/v1/customers/{ref}"): _READ,
    ("GET", "/v1/customers/{ref}/events"): _READ,
    ("GET", "/v1/customers/{ref}/messages"): _READ,
    ("GET", "/v1/customers/{ref}/journeys"): _READ,
    ("GET", "/v1/customers/{ref}/subscriptions"): _READ,
    ("GET", "/v1/customers/{ref}/inbox"): _READ,
    ("GET", "/v1/journeys"): _READ,
    ("GET", "/v1/journeys/schema"): _READ,
    ("GET", "/v1/journeys/{journey_id}"): _READ,
    ("GET", "/v1/journeys/{journey_id}/draft"): _READ,
    ("GET", "/v1/journeys/{journey_id}/channels"): _READ,
    ("GET", "/v1/journeys/{journey_id}/runs"): _READ,
    ("GET", "/v1/templates"): _READ,
    ("GET", "/v1/templates/{template_id}"): _READ,
    ("GET", "/v1/templates/{template_id}/versions/{version}"): _READ,
    ("GET", "/v1/tasks"): _READ,
    ("GET", "/v1/tasks/{task_id}"): _READ,
    ("GET", "/v1/launches"): _READ,
    ("GET", "/v1/launches/{launch_id}"): _READ,
    ("GET", "/v1/schedules"): _READ,
    ("GET", "/v1/schedules/{schedule_id}"): _READ,
    ("GET", "/v1/suppressions"): _READ,
    ("GET", "/v1/dead-letters"): _READ,
    ("GET", "/v1/dead-letters/{letter_id}"): _READ,
    # -- manage: journeys, templates, schedules --------------------------------------------
    ("POST", "/v1/journeys"): _JOURNEY,
    ("PUT", "/v1/journeys/{journey_id}/draft"): _JOURNEY,
    ("POST", "/v1/journeys/{journey_id}/validate"): _JOURNEY,
    ("POST", "/v1/journeys/{journey_id}/publish"): _JOURNEY,
    ("POST", "/v1/journeys/{journey_id}/pause"): _JOURNEY,
    ("POST", "/v1/journeys/{journey_id}/resume"): _JOURNEY,
    ("POST", "/v1/journeys/{journey_id}/archive"): _JOURNEY,
    ("POST", "/v1/journeys/{journey_id}/migrate"): _JOURNEY,
    ("POST", "/v1/journeys/{journey_id}/schedules"): _JOURNEY,
    ("POST", "/v1/schedules/{schedule_id}/pause"): _MANAGE,
    ("POST", "/v1/schedules/{schedule_id}/unpause"): _MANAGE,
    ("DELETE", "/v1/schedules/{schedule_id}"): _MANAGE,
    ("POST", "/v1/templates"): _TEMPLATE,
    ("PUT", "/v1/templates/{template_id}"): _TEMPLATE,
    ("POST", "/v1/templates/{template_id}/preview"): _TEMPLATE,
    ("POST", "/v1/templates/{template_id}/test-send"): _TEMPLATE,
    # -- operate: runs, tasks, customers' contact settings ----------------------------------
    ("POST", "/v1/journeys/{journey_id}/enroll"): _OPERATE,
    ("POST", "/v1/journeys/{journey_id}/launches"): _OPERATE,
    ("POST", "/v1/launches/{launch_id}/cancel"): _OPERATE,
    ("POST", "/v1/customers/{ref}/journeys/{journey_id}/steer"): _OPERATE,
    ("POST", "/v1/tasks/{task_id}/close"): _OPERATE,
    ("PUT", "/v1/customers/{ref}/subscriptions"): _OPERATE,
    ("POST", "/v1/suppressions"): _OPERATE,
    ("DELETE", "/v1/suppressions/{channel}/{address}"): _OPERATE,
    ("POST", "/v1/customers/{ref}/inbox/{message_id}/read"): _OPERATE,
    ("POST", "/v1/dead-letters/{letter_id}/replay"): _OPERATE,
    # -- admin: keys, audit ----------------------------------------------------------------
    ("POST", "/v1/keys"): _ADMIN,
    ("GET", "/v1/keys"): _ADMIN,
    ("DELETE", "/v1/keys/{key_id}"): _ADMIN,
    ("GET", "/v1/audit"): _ADMIN,
    # -- admin: privacy (erasure, and the export of everything held about a person) ----------
    ("DELETE", "/v1/customers/{ref}"): _ADMIN,
    ("GET", "/v1/erasures/{erasure_id}"): _ADMIN,
    ("POST", "/v1/regulations"): _ADMIN,
    ("GET", "/v1/customers/{ref}/export"): _ADMIN,
}


def rule_for(method: str, path: str) -> Rule | None:
    """The rule of a route (HEAD is answered by the GET route); None = not declared."""
    return ROUTE_SCOPES.get(("GET" if method == "HEAD" else method, path))
