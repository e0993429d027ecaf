"""Activities the journey workflow calls. All I/O of a journey happens here."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import waits, webhooks
from activities.channels import Channel, OutboxChannel, RenderedMessage
from activities.channels.email import PermanentDeliveryError
from activities.contact_policy import ContactPolicy, Decision
from activities.links import unsubscribe_url
from activities.rendering import TemplateError, render
from activities.scoring import MODELS
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
from store.events import NOTIFY_CHANNEL
from store.profiles import profile_stats

log = structlog.stdlib.get_logger("activities")


def template_context(
    profile: ProfileSnapshot,
    entry: dict[str, Any] | None,
    journey_id: str,
    version: int | None = None,
) -> dict[str, Any]:
    """What every template sees (see models.validation.TEMPLATE_VARIABLES)."""
    return {
        "profile": profile.traits,
        "customer": profile.as_context(),
        "event": entry or {},
        "journey": {"id": journey_id, "version": version},
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
    ) -> None:
        self.pool = pool
        self.channels = channels or {"outbox": OutboxChannel()}
        # (public base URL, signing secret) for unsubscribe links in marketing messages.
        self.links = links
        self.http = http or httpx.AsyncClient()
        self.policy = policy or ContactPolicy([])

    async def _profile(self, customer_id: str, *, stats: bool) -> ProfileSnapshot:
        # A merged-away customer reads as the survivor it was merged into.
        row = await self.pool.fetchrow(
            "SELECT coalesce(s.id, c.id) AS id, coalesce(s.traits, c.traits) AS traits, "
            "coalesce(s.timezone, c.timezone) AS timezone FROM customers c "
            "LEFT JOIN customers s ON s.id = c.merged_into WHERE c.id = $1",
            customer_id,
        )
        if row is None:
            raise ApplicationError(f"customer {customer_id!r} not found", type="InvalidRequest")
        figures = await profile_stats(self.pool, row["id"]) if stats else {}
        return ProfileSnapshot(
            customer_id=row["id"],
            traits=dict(row["traits"]),
            stats={**figures, "timezone": row["timezone"]},
        )

    @activity.defn(name="load_profile")
    async def load_profile(self, customer_id: str) -> ProfileSnapshot:
        return await self._profile(customer_id, stats=True)

    @activity.defn(name="send_message")
    async def send_message(self, req: SendRequest) -> SendResult:
        """Reserve under the idempotency key, deliver, record: a retry never sends twice."""
        bound = log.bind(
            customer_id=req.customer_id,
            journey_id=req.journey_id,
            workflow_id=req.workflow_id,
            step=req.step_id,
            key=req.idempotency_key,
        )
        channel = self.channels.get(req.channel)
        if channel is None:
            raise ApplicationError(
                f"channel {req.channel!r} is not configured here", type="InvalidRequest"
            )
        profile = await self._profile(req.customer_id, stats=False)
        customer_id = profile.customer_id  # the survivor, if the customer was merged meanwhile
        ctx = template_context(profile, req.entry, req.journey_id, req.journey_version)
        try:
            subject = render(req.subject, ctx) if req.subject else None
            body = render(req.body, ctx)
        except TemplateError as err:
            raise ApplicationError(
                f"step {req.step_id!r}: template error: {err}", type="TemplateError"
            ) from err
        async with self.pool.acquire() as conn, conn.transaction():
            await self.policy.lock(conn, customer_id)
            row = await conn.fetchrow(
                "SELECT id, status, skip_reason, address FROM messages WHERE idempotency_key = $1",
                req.idempotency_key,
            )
            if row is None and req.skip_reason is not None:
                decision = Decision(False, req.skip_reason)
            elif row is None:
                decision = await self.policy.decide(
                    conn,
                    customer_id=customer_id,
                    traits=profile.traits,
                    channel=req.channel,
                    category=req.category,
                    topic=req.topic,
                    journey_id=req.journey_id,
                    journey_cap=req.journey_cap,
                )
            if row is None:
                row = await conn.fetchrow(
                    "INSERT INTO messages (idempotency_key, customer_id, journey_id, "
                    "journey_version, step_id, workflow_id, channel, subject, body, status, "
                    "category, skip_reason, address) "
                    "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13) "
                    "RETURNING id, status, skip_reason, address",
                    req.idempotency_key,
                    customer_id,
                    req.journey_id,
                    req.journey_version,
                    req.step_id,
                    req.workflow_id,
                    req.channel,
                    subject,
                    body,
                    "pending" if decision.allowed else "skipped",
                    req.category,
                    decision.reason,
                    decision.address,
                )
                fresh = True
            else:
                fresh = False
        assert row is not None
        if row["status"] == "skipped":
            bound.info("send.skipped", reason=row["skip_reason"])
            return SendResult(
                message_id=row["id"],
                status="skipped",
                reason=row["skip_reason"],
                duplicate=not fresh,
            )
        if row["status"] != "pending":
            bound.info("send.duplicate", status=row["status"])
            return SendResult(message_id=row["id"], status=row["status"], duplicate=True)
        unsubscribe = None
        if self.links and req.category == "marketing":
            base, secret = self.links
            unsubscribe = unsubscribe_url(base, secret, customer_id, req.channel, req.topic)
        try:
            delivery = await channel.deliver(
                RenderedMessage(
                    req.idempotency_key,
                    customer_id,
                    req.channel,
                    subject,
                    body,
                    to=row["address"],
                    unsubscribe_url=unsubscribe,
                )
            )
        except PermanentDeliveryError as err:
            # A hard bounce: recorded on the message, and the address is suppressed.
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE messages SET status = 'bounced', skip_reason = $2 WHERE id = $1",
                    row["id"],
                    f"hard_bounce {err.code}",
                )
                await conn.execute(
                    "INSERT INTO suppressions (channel, address, reason) VALUES ($1, $2, "
                    "'hard_bounce') ON CONFLICT DO NOTHING",
                    req.channel,
                    row["address"],
                )
            bound.warning("send.bounced", code=err.code, error=err.message)
            return SendResult(
                message_id=row["id"], status="bounced", reason="hard_bounce", duplicate=False
            )
        await self.pool.execute(
            "UPDATE messages SET status = $2, sent_at = now() WHERE id = $1",
            row["id"],
            delivery.status,
        )
        bound.info("send.done", channel=req.channel, status=delivery.status, message_id=row["id"])
        return SendResult(message_id=row["id"], status=delivery.status, duplicate=False)

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
            "goal_at = $4, arm = $5, holdout = $6 WHERE enrollment_id = $1",
            done.enrollment_id,
            done.status,
            done.exit_reason,
            done.goal_at,
            done.arm,
            done.holdout,
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
        ctx = template_context(profile, req.entry, req.journey_id)
        return await webhooks.call(self.http, req, ctx)

    @activity.defn(name="create_task")
    async def create_task(self, req: TaskRequest) -> TaskCreated:
        """One task per idempotency key; the optional notification carries the same key."""
        profile = await self._profile(req.customer_id, stats=False)
        ctx = template_context(profile, req.entry, req.journey_id)
        try:
            title = render(req.title, ctx)
            details = webhooks.render_payload(req.details, ctx)
        except TemplateError as err:
            raise ApplicationError(
                f"step {req.step_id!r}: template error: {err}", type="TemplateError"
            ) from err
        row = await self.pool.fetchrow(
            "INSERT INTO tasks (idempotency_key, customer_id, journey_id, step_id, workflow_id, "
            "enrollment_id, queue, title, details, status) "
            "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,'open') "
            "ON CONFLICT (idempotency_key) "
            "DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key RETURNING id",
            req.idempotency_key,
            req.customer_id,
            req.journey_id,
            req.step_id,
            req.workflow_id,
            req.enrollment_id,
            req.queue,
            title,
            details,
        )
        assert row is not None
        if req.notify_url:
            body = {"task_id": row["id"], "queue": req.queue, "title": title, "details": details,
                    "customer_id": req.customer_id, "journey_id": req.journey_id}  # fmt: skip
            try:
                resp = await self.http.post(
                    req.notify_url,
                    json=body,
                    headers={"Idempotency-Key": req.idempotency_key},
                    timeout=10,
                )
            except httpx.HTTPError as err:
                raise ApplicationError(f"task notification failed: {err!r}") from err
            if resp.status_code >= 400:
                raise ApplicationError(f"task notification answered {resp.status_code}")
        return TaskCreated(task_id=row["id"])

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
