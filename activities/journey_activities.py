"""Activities the journey workflow calls. All I/O of a journey happens here."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import waits, webhooks
from activities.channel_choice import ChannelRanker, EngagementRanker
from activities.channels import (
    Channel,
    PermanentDeliveryError,
    ProviderBusy,
    RenderedMessage,
    StoredChannel,
    definitely_not_sent,
)
from activities.contact_policy import ContactPolicy, Decision
from activities.links import unsubscribe_url
from activities.rate_limits import RateLimits
from activities.rendering import TemplateError, off_loop, render, render_html
from activities.scoring import MODELS
from activities.signing import SIGNATURE_HEADER, signature_header
from activities.tracking import instrument
from core.outbound import OutboundPolicy, OutboundRefused, outbound_client
from core.settings import get_settings
from models.journey import Template
from models.runtime import (
    ProfileSnapshot,
    ProfileUpdate,
    QuietRequest,
    RunFinished,
    ScoreRequest,
    ScoreResult,
    SendRequest,
    SendResult,
    TaskCreated,
    TaskRequest,
    WaitRequest,
    WaitResolution,
    WebhookRequest,
    WebhookResult,
)
from store import feedback
from store.events import NOTIFY_CHANNEL
from store.profiles import profile_stats
from store.templates import get_version

_MESSAGE_COLUMNS = "id, status, skip_reason, address, channel, customer_id, subject, body, html"
_SELECT_MESSAGE = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE idempotency_key = $1"
_TASK_COLUMNS = "id, customer_id, title, details"
_SELECT_TASK = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE idempotency_key = $1"

log = structlog.stdlib.get_logger("activities")


# Attempts of a hand-off's notify_url (5xx, timeouts) before it is recorded as failed; with
# the hand-off's retry policy (1 s doubling, at most 1 min apart) that is about 2 minutes.
NOTIFY_ATTEMPTS = 8

# A provider call gets at least this long; an attempt with less left does not start one.
MIN_PROVIDER_SECONDS = 2.0


def _deadline(started: float | None, margin: float = 3.0) -> float | None:
    """Seconds left for the provider call before this activity attempt times out (counted
    from when this worker began the attempt; the server's clock may differ from ours)."""
    if started is None or not activity.in_activity():
        return None
    timeout = activity.info().start_to_close_timeout
    if timeout is None:
        return None
    return max(timeout.total_seconds() - (time.monotonic() - started) - margin, 0.0)


# Rounds of render-then-lock a send makes when the profile or its channel choice changes
# between the render and the lock; past them the attempt fails and Temporal retries later.
RESERVE_ROUNDS = 3

Conn = asyncpg.Connection | asyncpg.Pool


async def _read_profile(conn: Conn, customer_id: str) -> ProfileSnapshot | None:
    """The customer as they are now: a merged-away id reads as the survivor it was merged
    into; None once they are erased (no row left). Stats hold only the timezone."""
    row = await conn.fetchrow(
        "SELECT coalesce(s.id, c.id) AS id, coalesce(s.traits, c.traits) AS traits, "
        "coalesce(s.timezone, c.timezone) AS timezone FROM customers c "
        "LEFT JOIN customers s ON s.id = c.merged_into WHERE c.id = $1",
        customer_id,
    )
    if row is None:
        return None
    return ProfileSnapshot(
        customer_id=row["id"], traits=dict(row["traits"]), stats={"timezone": row["timezone"]}
    )


def _erased(key: str) -> ApplicationError:
    """A send or a task for a customer erased meanwhile: nothing is delivered or stored, and
    retrying cannot change that (their run is being deleted by the erasure). Logged by its
    idempotency key only: the erasure keeps customer ids out of what stays behind."""
    log.info("customer_erased", key=key)
    return ApplicationError(
        "the customer was erased: nothing sent, nothing stored",
        type="CustomerErased",
        non_retryable=True,
    )


@dataclass(frozen=True)
class _Content:
    """What a send renders: inline in the step, or a pinned stored template version."""

    subject: str | None
    body: str
    html: str | None
    template_id: str | None = None
    version: int | None = None


_Rendered = tuple[str | None, str, str | None]  # subject, body, html


def _render_contents(
    contents: dict[str, _Content], ctx: dict[str, Any]
) -> dict[str, _Rendered | TemplateError]:
    """Each variant's subject, body and html rendered (run in the render threads); a
    variant's TemplateError is kept, for the send to raise if it chooses that variant."""
    out: dict[str, _Rendered | TemplateError] = {}
    for name, content in contents.items():
        try:
            out[name] = (
                render(content.subject, ctx) if content.subject else None,
                render(content.body, ctx),
                render_html(content.html, ctx) if content.html else None,
            )
        except TemplateError as err:
            out[name] = err
    return out


def _variant(channel: str, contents: dict[str, _Content]) -> str:
    """The content a send on `channel` uses: its own variant, else the step's ("*")."""
    return channel if channel in contents else "*"


def request_context(
    profile: ProfileSnapshot, req: SendRequest | WebhookRequest | TaskRequest
) -> dict[str, Any]:
    """The template context of a step's request (send, webhook, hand-off): one place that says
    which of the request's fields the templates see."""
    return template_context(
        profile,
        req.entry,
        req.journey_id,
        req.journey_version,
        trigger=req.trigger,
        results=req.results,
    )


def template_context(
    profile: ProfileSnapshot,
    entry: dict[str, Any] | None,
    journey_id: str,
    version: int | None = None,
    *,
    trigger: dict[str, Any] | None = None,
    results: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What every template sees, as models.context declares it (and publish checks): `event`
    is the entry event, `trigger` the event the last wait_for matched (else the entry)."""
    return {
        "profile": profile.traits,
        "customer": profile.as_context(),
        "event": entry or {},
        "trigger": trigger or entry or {},
        "journey": {"id": journey_id, "version": version},
        "results": results or {},
    }


class JourneyActivities:
    def __init__(
        self,
        pool: asyncpg.Pool,
        http: httpx.AsyncClient | None = None,
        *,
        policy: ContactPolicy | None = None,
        channels: dict[str, Channel] | None = None,
        links: tuple[str, str] | None = None,
        rates: RateLimits | None = None,
        ranker: ChannelRanker | None = None,
        signing_secret: str | None = None,
        outbound: OutboundPolicy | None = None,
    ) -> None:
        self.pool = pool
        self.signing_secret = signing_secret  # signs webhook steps and hand-off notifications
        self.channels = channels or {c: StoredChannel(c) for c in ("outbox", "in_app")}
        self.rates = rates or RateLimits({})
        self.ranker = ranker or EngagementRanker()
        # (public base URL, signing secret) for unsubscribe and tracked links in email.
        self.links = links
        # Webhook steps and hand-off notifications call URLs journey authors wrote: a given
        # client must be a `core.outbound.outbound_client`; the one opened here is, with
        # `outbound` (default: from the settings). Closed by `aclose` only if opened here.
        self._owns_http = http is None
        if http is None:
            http = outbound_client(outbound or OutboundPolicy.from_settings(get_settings()))
        self.http = http
        self.policy = policy or ContactPolicy([])

    async def aclose(self) -> None:
        """At worker shutdown (worker.JourneyWorker): close the HTTP client this opened."""
        if self._owns_http:
            await self.http.aclose()

    async def _profile(self, customer_id: str, *, stats: bool) -> ProfileSnapshot:
        found = await _read_profile(self.pool, customer_id)
        if found is None:
            raise ApplicationError(f"customer {customer_id!r} not found", type="InvalidRequest")
        if not stats:
            return found
        figures = await profile_stats(self.pool, found.customer_id)
        return found.model_copy(update={"stats": {**figures, **found.stats}})

    @activity.defn(name="load_profile")
    async def load_profile(self, customer_id: str) -> ProfileSnapshot:
        return await self._profile(customer_id, stats=True)

    @activity.defn(name="send_message")
    async def send_message(self, req: SendRequest) -> SendResult:
        """Reserve under the idempotency key (choosing the channel under the contact policy),
        claim, deliver with the key, record. A retry reconciles instead of sending twice: a
        row already final is answered from the row; a row left `sending` by an attempt that
        died mid-call is delivered again with the same key, which HTTP providers deduplicate
        (SMTP: see activities.channels.email for the one window no SMTP client can close).

        A retry (rate limit, provider busy, an attempt out of time) finds its reservation
        before anything else and delivers what it stored: nothing is rendered again. Only a
        first attempt renders, and only the content of the channel it chooses (see
        `_reserve`), against the profile as it is under the customer's lock."""
        started = time.monotonic()
        bound = log.bind(
            customer_id=req.customer_id,
            journey_id=req.journey_id,
            workflow_id=req.workflow_id,
            step=req.step_id,
            key=req.idempotency_key,
        )
        # Without the lock: a reservation, once made, never changes its content, and the
        # claim checks it again under the lock.
        row = await self.pool.fetchrow(_SELECT_MESSAGE, req.idempotency_key)
        fresh = False
        if row is None:
            row, fresh = await self._reserve(req)
        result = SendResult(
            message_id=row["id"],
            status=row["status"],
            reason=row["skip_reason"],
            duplicate=not fresh,
            channel=row["channel"],
        )
        if row["status"] == "skipped":
            bound.info("send.skipped", reason=row["skip_reason"], channel=row["channel"])
            return result
        if row["status"] == "failed" and row["skip_reason"] == "template_error":
            # This attempt's render failed, or a retried attempt of such a send: the step
            # fails for good, and the stored message says why.
            error = await self.pool.fetchval("SELECT error FROM messages WHERE id = $1", row["id"])
            bound.warning("send.template_error", message_id=row["id"], error=error)
            raise ApplicationError(
                error or f"step {req.step_id!r}: template error (message {row['id']})",
                type="TemplateError",
            )
        if row["status"] not in ("pending", "sending"):
            bound.info("send.duplicate", status=row["status"])
            return result.model_copy(update={"duplicate": True})
        return await self._deliver(req, row, bound, started)

    async def _reserve(self, req: SendRequest) -> tuple[asyncpg.Record, bool]:
        """The send's reservation: (row, made by this call).

        Optimistic, so that no render runs under the customer's lock (an erasure or a merge
        waits for that lock, and a render may take its whole budget): read the profile and
        choose the channel without the lock, render that channel's content in the render
        threads, then take the lock and read the customer again. Reserved only if the
        customer is the same one with the same traits (what was rendered, the address and
        the policy's customer id all hold) and the choice made under the lock is a content
        already rendered; else the lock is let go and this goes round again. A customer
        erased meanwhile gets no row at all (their data is gone, and a row would carry an
        address and a body of theirs): the send ends as `CustomerErased`, not retried. A
        customer merged meanwhile is decided for the survivor (caps, consent, suppression)."""
        contents = await self._contents(req)
        rendered: dict[str, _Rendered | TemplateError] = {}
        wanted: set[str] = set()
        seen: ProfileSnapshot | None = None
        for _ in range(RESERVE_ROUNDS):
            profile = await _read_profile(self.pool, req.customer_id)
            if profile is None:
                raise _erased(req.idempotency_key)
            if profile != seen:  # renders of an older profile are of no use
                rendered, seen = {}, profile
            ctx = request_context(profile, req)
            async with self.pool.acquire() as conn:
                guess, _ = await self._choose(conn, req, profile.customer_id, profile)
            wanted.add(_variant(guess, contents))
            todo = {name: contents[name] for name in wanted - rendered.keys()}
            if todo:
                rendered |= await off_loop(_render_contents, todo, ctx)
            async with self.pool.acquire() as conn, conn.transaction():
                await self.policy.lock(conn, profile.customer_id)
                row = await conn.fetchrow(_SELECT_MESSAGE, req.idempotency_key)
                if row is not None:  # an attempt that overlapped this one reserved it
                    return row, False
                current = await _read_profile(conn, req.customer_id)
                if current is None:
                    raise _erased(req.idempotency_key)
                if current != profile:  # merged, or traits changed: render again, outside
                    log.info("send.profile_changed", key=req.idempotency_key)
                    continue
                channel_name, decision = await self._choose(conn, req, current.customer_id, current)
                variant = _variant(channel_name, contents)
                if variant not in rendered:  # the choice moved (a cap filled, a consent)
                    wanted.add(variant)
                    continue
                parts = rendered[variant]
                content = contents[variant]
                failure: str | None = None
                if isinstance(parts, TemplateError):
                    # Stored as a failed message (committed below), so the channel report and
                    # the customer's messages show it; the step then fails for good.
                    failure = f"step {req.step_id!r}: template error: {parts}"
                    subject, body, html = None, "", None
                    decision = Decision(False, "template_error", decision.address)
                else:
                    subject, body, html = parts
                row = await conn.fetchrow(
                    "INSERT INTO messages (idempotency_key, customer_id, journey_id, "
                    "journey_version, step_id, workflow_id, channel, subject, body, html, "
                    "status, category, skip_reason, address, template_id, template_version) "
                    "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16) "
                    # An overlapping attempt that locked another id (a merge came between
                    # them) may have reserved it: the row it made stands.
                    "ON CONFLICT (idempotency_key) DO NOTHING RETURNING " + _MESSAGE_COLUMNS,
                    req.idempotency_key,
                    current.customer_id,
                    req.journey_id,
                    req.journey_version,
                    req.step_id,
                    req.workflow_id,
                    channel_name,
                    subject,
                    body,
                    html,
                    "failed" if failure else "pending" if decision.allowed else "skipped",
                    req.category,
                    decision.reason,
                    decision.address,
                    content.template_id,
                    content.version,
                )
                if row is None:
                    row = await conn.fetchrow(_SELECT_MESSAGE, req.idempotency_key)
                    assert row is not None
                    return row, False
                if failure is not None:
                    await conn.execute(
                        "UPDATE messages SET error = $2 WHERE id = $1", row["id"], failure[:1000]
                    )
                return row, True
        # The profile or the choice kept changing under us: Temporal retries with backoff.
        raise ApplicationError(
            f"step {req.step_id!r}: the customer's profile kept changing while the send was "
            "prepared",
            type="ProfileChanging",
        )

    async def _deliver(
        self, req: SendRequest, row: asyncpg.Record, bound: Any, started: float | None = None
    ) -> SendResult:
        """Deliver what the reservation stored (a retry sends exactly that, rendered once)."""
        name: str = row["channel"]
        subject, body, html = row["subject"], row["body"], row["html"]
        channel = self.channels.get(name)
        if channel is None:  # reserved by a worker configured differently: another may have it
            raise ApplicationError(
                f"channel {name!r} is not configured on this worker", type="ChannelUnavailable"
            )
        wait = await self.rates.wait_for(self.pool, name)
        if wait is not None:
            raise ApplicationError(
                f"{name} rate limit reached; retrying in {wait:.2f}s",
                type="RateLimited",
                next_retry_delay=timedelta(seconds=wait),
            )
        links: list[str] = []
        unsubscribe = None
        if self.links and name == "email":
            base, secret = self.links
            if req.category == "marketing":
                unsubscribe = unsubscribe_url(base, secret, row["customer_id"], name, req.topic)
            tracked = instrument(body, html, base_url=base, secret=secret, message_id=row["id"])
            body, html, links = tracked.text, tracked.html, tracked.links
        left = _deadline(started)
        if left is not None and left < MIN_PROVIDER_SECONDS:
            # Too late in this attempt: Temporal may already be starting the next one, and
            # two attempts must never both hand the message over.
            raise ApplicationError("no time left in this attempt", type="AttemptExpired")
        claimed = await self._claim(req, row, links)
        if isinstance(claimed, SendResult):
            return claimed
        attempt = claimed
        if attempt > 1:
            bound.warning("send.reconcile", channel=name, attempt=attempt)
        try:
            # Finish before Temporal gives up on this attempt: a live attempt never races
            # its own retry (a dead worker's attempt cannot).
            async with asyncio.timeout(_deadline(started)):
                delivery = await channel.deliver(
                    RenderedMessage(
                        req.idempotency_key,
                        row["customer_id"],
                        name,
                        subject,
                        body,
                        to=row["address"],
                        html=html,
                        unsubscribe_url=unsubscribe,
                        message_id=row["id"],
                        journey_id=req.journey_id,
                        step_id=req.step_id,
                    )
                )
        except PermanentDeliveryError as err:
            return await self._refused(req, row, attempt, name, err, bound)
        except Exception as err:
            not_sent = definitely_not_sent(err)
            await self.pool.execute(
                "UPDATE messages SET error = $3, status = CASE WHEN $4 THEN 'pending' "
                "ELSE status END WHERE id = $1 AND attempts = $2 AND status = 'sending'",
                row["id"],
                attempt,
                f"{type(err).__name__}: {err}"[:1000],
                not_sent,
            )
            if isinstance(err, ProviderBusy):
                raise ApplicationError(
                    str(err),
                    type="ProviderBusy",
                    next_retry_delay=timedelta(seconds=err.retry_after),
                ) from err
            if isinstance(err, TimeoutError):
                raise ApplicationError(
                    f"{name} provider did not answer in time", type="ProviderTimeout"
                ) from err
            raise
        recorded = await self.pool.fetchval(
            "UPDATE messages SET status = $3, provider_id = $4, sent_at = now(), error = NULL "
            "WHERE id = $1 AND attempts = $2 AND status = 'sending' RETURNING id",
            row["id"],
            attempt,
            delivery.status,
            delivery.provider_id,
        )
        if recorded is None:  # a later attempt or a provider callback got there first
            done = await self.pool.fetchrow(_SELECT_MESSAGE, req.idempotency_key)
            if done is None:  # erased while the provider had it: nothing left to record
                raise _erased(req.idempotency_key)
            if done["status"] in ("pending", "sending"):  # that attempt is not finished
                raise ApplicationError("a later attempt owns this send", type="AttemptSuperseded")
            return SendResult(
                message_id=done["id"], status=done["status"], duplicate=True, channel=name
            )
        bound.info("send.done", channel=name, status=delivery.status, message_id=row["id"])
        return SendResult(
            message_id=row["id"], status=delivery.status, duplicate=False, channel=name
        )

    async def _claim(
        self, req: SendRequest, row: asyncpg.Record, links: list[str]
    ) -> int | SendResult:
        """Under the customer's lock: a send still `pending` is checked again for
        suppression and consent (a retry may come hours later, after a STOP or a bounce),
        then claimed (`sending`, attempt + 1). From here on a provider may have the message;
        a second claim means an earlier attempt died or timed out after this point.

        The lock is the one of the customer the message belongs to now (a merge moves a
        customer's messages to the survivor under both locks; an erasure deletes them under
        the customer's): a message gone is an erased customer's, and is not delivered."""
        customer_id: str = row["customer_id"]
        for _ in range(RESERVE_ROUNDS):
            async with self.pool.acquire() as conn, conn.transaction():
                await self.policy.lock(conn, customer_id)
                current = await conn.fetchrow(
                    "SELECT status, skip_reason, customer_id FROM messages WHERE id = $1 "
                    "FOR UPDATE",
                    row["id"],
                )
                if current is None:
                    raise _erased(req.idempotency_key)
                if current["customer_id"] != customer_id:  # merged meanwhile: its lock
                    customer_id = current["customer_id"]
                    continue
                done = SendResult(
                    message_id=row["id"],
                    status=current["status"],
                    reason=current["skip_reason"],
                    duplicate=True,
                    channel=row["channel"],
                )
                if current["status"] not in ("pending", "sending"):
                    return done
                if current["status"] == "pending":
                    refusal = await self.policy.refusal(
                        conn,
                        customer_id=customer_id,
                        channel=row["channel"],
                        category=req.category,
                        topic=req.topic,
                        address=row["address"],
                    )
                    if refusal is not None:
                        await conn.execute(
                            "UPDATE messages SET status = 'skipped', skip_reason = $2 "
                            "WHERE id = $1",
                            row["id"],
                            refusal,
                        )
                        return done.model_copy(update={"status": "skipped", "reason": refusal})
                return await conn.fetchval(
                    "UPDATE messages SET status = 'sending', attempts = attempts + 1, "
                    "claimed_at = now(), links = $2 WHERE id = $1 RETURNING attempts",
                    row["id"],
                    links,
                )
        raise ApplicationError("the message kept moving between customers", type="ClaimMoved")

    async def _refused(
        self,
        req: SendRequest,
        row: asyncpg.Record,
        attempt: int,
        name: str,
        err: PermanentDeliveryError,
        bound: Any,
    ) -> SendResult:
        """A refusal for good. About the address: a hard bounce (recorded, the address
        suppressed, a `Message Bounced` event, as when a provider reports it later). About
        the message: only this message fails. Only the attempt that holds the claim records."""
        async with self.pool.acquire() as conn, conn.transaction():
            owner = await conn.fetchval(
                "SELECT id FROM messages WHERE id = $1 AND attempts = $2 AND status = 'sending' "
                "FOR UPDATE",
                row["id"],
                attempt,
            )
            if owner is not None and err.suppress:
                sent = await feedback.get_message(conn, row["id"])
                assert sent is not None
                await feedback.record_bounce(conn, sent, "hard", str(err))
            elif owner is not None:
                await conn.execute(
                    "UPDATE messages SET status = 'failed', skip_reason = 'rejected', error = $2 "
                    "WHERE id = $1",
                    row["id"],
                    str(err)[:1000],
                )
        if owner is None:
            done = await self.pool.fetchrow(_SELECT_MESSAGE, req.idempotency_key)
            if done is None:
                raise _erased(req.idempotency_key)
            if done["status"] in ("pending", "sending"):
                raise ApplicationError("a later attempt owns this send", type="AttemptSuperseded")
            return SendResult(
                message_id=done["id"], status=done["status"], duplicate=True, channel=name
            )
        status, reason = ("bounced", "hard_bounce") if err.suppress else ("failed", "rejected")
        bound.warning(f"send.{status}", channel=name, code=err.code, error=err.message)
        return SendResult(
            message_id=row["id"], status=status, reason=reason, duplicate=False, channel=name,
            error=str(err)[:500],
        )  # fmt: skip

    async def _contents(self, req: SendRequest) -> dict[str, _Content]:
        """The step's content ("*") and its per-channel variants, stored ones loaded."""
        inline = Template.model_validate(
            {k: v for k, v in (("subject", req.subject), ("body", req.body), ("html", req.html),
                               ("ref", req.template_id), ("version", req.template_version))
             if v is not None}
        )  # fmt: skip
        return {
            name: await self._content(req, t) for name, t in [("*", inline), *req.variants.items()]
        }

    async def _content(self, req: SendRequest, t: Template) -> _Content:
        if t.ref is None:
            assert t.body is not None  # the definition requires body or ref
            return _Content(t.subject, t.body, t.html)
        found = await get_version(self.pool, t.ref, t.version)
        if found is None:
            raise ApplicationError(
                f"step {req.step_id!r}: template {t.ref!r} version {t.version} does not exist",
                type="InvalidRequest",
            )
        return _Content(found.subject, found.body, found.html, found.template_id, found.version)

    def _reachable(self) -> list[str]:
        """The channels a `best` send chooses among."""
        return [c for c in self.channels if c not in ("outbox", "webhook")]

    async def _choose(
        self,
        conn: asyncpg.Connection,
        req: SendRequest,
        customer_id: str,
        profile: ProfileSnapshot,
    ) -> tuple[str, Decision]:
        """The first candidate channel the policy allows; else the first refusal. Binding
        only under the customer's lock; without it, a guess of what the lock will choose."""
        candidates = req.candidates
        if candidates == ["best"]:
            candidates = await self.ranker.rank(conn, customer_id, self._reachable())
        if req.skip_reason is not None:
            return candidates[0], Decision(False, req.skip_reason)
        refused: tuple[str, Decision] | None = None
        for name in candidates:
            if name not in self.channels:
                if len(candidates) == 1:
                    raise ApplicationError(
                        f"channel {name!r} is not configured here", type="InvalidRequest"
                    )
                decision = Decision(False, "channel_unavailable")
            else:
                decision = await self.policy.decide(
                    conn,
                    customer_id=customer_id,
                    traits=profile.traits,
                    channel=name,
                    category=req.category,
                    topic=req.topic,
                    journey_id=req.journey_id,
                    journey_cap=req.journey_cap,
                )
            if decision.allowed:
                return name, decision
            refused = refused or (name, decision)
        assert refused is not None
        return refused

    @activity.defn(name="release_events")
    async def release_events(self, message_ids: list[str]) -> None:
        """Hand events a finished run did not use back to the router (routed again)."""
        await self.pool.execute(
            "UPDATE events SET routed_at = NULL WHERE message_id = ANY($1::text[])",
            message_ids,
        )
        await self.pool.execute(f"NOTIFY {NOTIFY_CHANNEL}")

    @activity.defn(name="record_run_finished")
    async def record_run_finished(self, done: RunFinished) -> None:
        await self.pool.execute(
            "UPDATE journey_runs SET status = $2, exit_reason = $3, ended_at = now(), "
            "goal_at = $4, arm = $5, holdout = $6, failures = $7 WHERE enrollment_id = $1",
            done.enrollment_id,
            done.status,
            done.exit_reason,
            done.goal_at,
            done.arm,
            done.holdout,
            done.failures,
        )
        if done.release:  # after the row says ended, so the router may enter them anew
            await self.release_events(done.release)

    @activity.defn(name="update_profile")
    async def update_profile(self, upd: ProfileUpdate) -> None:
        """Applied once per idempotency key, so a retried increment does not count twice."""
        async with self.pool.acquire() as conn, conn.transaction():
            first = await conn.fetchval(
                "INSERT INTO applied_effects (idempotency_key) VALUES ($1) "
                "ON CONFLICT DO NOTHING RETURNING true",
                upd.idempotency_key,
            )
            if not first:
                return
            row = await conn.fetchrow(
                "SELECT c.id, c.traits FROM customers c WHERE c.id = "
                "(SELECT coalesce(merged_into, id) FROM customers WHERE id = $1) FOR UPDATE",
                upd.customer_id,
            )
            if row is None:
                raise ApplicationError(
                    f"customer {upd.customer_id!r} not found", type="InvalidRequest"
                )
            traits = dict(row["traits"])
            traits.update(upd.set)
            for key, by in upd.increment.items():
                current = traits.get(key)
                base = (
                    current
                    if isinstance(current, int | float) and not isinstance(current, bool)
                    else 0
                )
                total = base + by
                traits[key] = int(total) if float(total).is_integer() else total
            for key in upd.unset:
                traits.pop(key, None)
            if upd.add_tags or upd.remove_tags:
                tags = [t for t in traits.get("tags") or [] if isinstance(t, str)]
                tags += [t for t in upd.add_tags if t not in tags]
                traits["tags"] = [t for t in tags if t not in upd.remove_tags]
            await conn.execute(
                "UPDATE customers SET traits = $2, updated_at = now() WHERE id = $1",
                row["id"],
                traits,
            )

    @activity.defn(name="score")
    async def score(self, req: ScoreRequest) -> ScoreResult:
        model = MODELS.get(req.model)
        if model is None:
            raise ApplicationError(f"unknown model {req.model!r}", type="InvalidRequest")
        return await model.score(self.pool, req.customer_id)

    @activity.defn(name="call_webhook")
    async def call_webhook(self, req: WebhookRequest) -> WebhookResult:
        profile = await self._profile(req.customer_id, stats=False)
        ctx = request_context(profile, req)
        return await webhooks.call(self.http, req, ctx, self.signing_secret)

    @activity.defn(name="create_task")
    async def create_task(self, req: TaskRequest) -> TaskCreated:
        """One task per idempotency key; the optional notification carries the same key.
        A retry (the notification failed) notifies with what the task row holds, rendering
        nothing again."""
        row = await self.pool.fetchrow(_SELECT_TASK, req.idempotency_key)
        if row is None:
            row = await self._task_row(req)
        if not req.notify_url:
            return TaskCreated(task_id=row["id"])
        body = {"task_id": row["id"], "queue": req.queue, "title": row["title"],
                "details": row["details"], "customer_id": row["customer_id"],
                "journey_id": req.journey_id}  # fmt: skip
        status, error = await self._notify(req.notify_url, body, req.idempotency_key)
        if error is not None:
            log.warning(
                "handoff.notify_failed", step_id=req.step_id, task_id=row["id"], status=status,
                error=error,
            )  # fmt: skip
        return TaskCreated(task_id=row["id"], notify_status=status, notify_error=error)

    async def _task_row(self, req: TaskRequest) -> asyncpg.Record:
        """The task, written as a send is reserved (see `_reserve`): rendered without the
        customer's lock, written under it if the profile is still the one rendered. None
        for a customer erased meanwhile (`CustomerErased`: no task, no notification with
        their data); the survivor's for a customer merged meanwhile."""
        for _ in range(RESERVE_ROUNDS):
            profile = await _read_profile(self.pool, req.customer_id)
            if profile is None:
                raise _erased(req.idempotency_key)
            ctx = request_context(profile, req)
            try:
                title = await off_loop(render, req.title, ctx)
                details = await off_loop(webhooks.render_payload, req.details, ctx)
            except TemplateError as err:
                raise ApplicationError(
                    f"step {req.step_id!r}: template error: {err}", type="TemplateError"
                ) from err
            async with self.pool.acquire() as conn, conn.transaction():
                await self.policy.lock(conn, profile.customer_id)
                current = await _read_profile(conn, req.customer_id)
                if current is None:
                    raise _erased(req.idempotency_key)
                if current != profile:
                    continue
                row = await conn.fetchrow(
                    "INSERT INTO tasks (idempotency_key, customer_id, journey_id, step_id, "
                    "workflow_id, enrollment_id, queue, title, details, status) "
                    "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,'open') "
                    "ON CONFLICT (idempotency_key) "
                    "DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key "
                    "RETURNING " + _TASK_COLUMNS,
                    req.idempotency_key,
                    current.customer_id,
                    req.journey_id,
                    req.step_id,
                    req.workflow_id,
                    req.enrollment_id,
                    req.queue,
                    title,
                    details,
                )
                assert row is not None
                return row
        raise ApplicationError(
            f"step {req.step_id!r}: the customer's profile kept changing while the task was "
            "prepared",
            type="ProfileChanging",
        )

    async def _notify(
        self, url: str, body: dict[str, Any], key: str
    ) -> tuple[int | None, str | None]:
        """(status, error) of a hand-off notification; error None means delivered. Bounded like
        the webhook step: a 4xx or a URL the outbound guard refuses is an answer (never
        retried); a 5xx, 408, 429, timeout or connection error raises (Temporal retries with
        backoff and the same Idempotency-Key) until attempt NOTIFY_ATTEMPTS, which reports the
        failure instead. Signed like the webhook step (Journeys-Signature over the raw body)."""
        last = not activity.in_activity() or activity.info().attempt >= NOTIFY_ATTEMPTS
        raw = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
        if self.signing_secret:
            headers[SIGNATURE_HEADER] = signature_header(self.signing_secret, raw)
        try:
            resp = await self.http.post(url, content=raw, headers=headers, timeout=10)
        except OutboundRefused as err:
            return None, f"notify_url refused: {err}"
        except httpx.HTTPError as err:
            if last:
                return None, f"notify_url unreachable after {NOTIFY_ATTEMPTS} attempts: {err!r}"
            raise ApplicationError(
                f"task notification failed: {err!r}", type="NotifyUnavailable"
            ) from err
        status = resp.status_code
        if status < 400:
            return status, None
        if status >= 500 or status in (408, 429):
            if last:
                return status, f"notify_url answered {status} ({NOTIFY_ATTEMPTS} attempts)"
            raise ApplicationError(f"task notification answered {status}", type="NotifyUnavailable")
        return status, f"notify_url answered {status}"

    @activity.defn(name="quiet_hours")
    async def quiet_hours(self, req: QuietRequest) -> WaitResolution:
        """When the quiet window ends, if `now` is inside it (customer's timezone)."""
        profile = await self._profile(req.customer_id, stats=False)
        zone = profile.stats.get("timezone") or profile.traits.get("timezone")
        until = waits.quiet_until(req.now, req.start, req.end, zone)
        return WaitResolution(deadline=until, note=f"timezone {zone or 'UTC'}")

    @activity.defn(name="resolve_wait")
    async def resolve_wait(self, req: WaitRequest) -> WaitResolution:
        profile = await self._profile(req.customer_id, stats=False)
        if req.at is not None:
            zone = profile.stats.get("timezone") or profile.traits.get("timezone")
            deadline = waits.next_local_time(req.now, req.at, zone, req.weekdays)
            return WaitResolution(deadline=deadline, note=f"timezone {zone or 'UTC'}")
        assert req.until is not None
        return waits.date_from(req.until, req.offset, req.entry, profile.traits)

    def all(self) -> list[object]:
        return [
            self.load_profile,
            self.send_message,
            self.record_run_finished,
            self.update_profile,
            self.score,
            self.call_webhook,
            self.resolve_wait,
            self.quiet_hours,
            self.create_task,
            self.release_events,
        ]
