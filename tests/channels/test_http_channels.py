"""SMS, push and webhook channels against a real local HTTP provider that deduplicates on
Idempotency-Key, as Twilio- and Stripe-style APIs do."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from activities.channels import (
    PermanentDeliveryError,
    ProviderBusy,
    ProviderUnavailable,
    RenderedMessage,
)
from activities.channels.http import PushChannel, SmsChannel, WebhookChannel
from activities.signing import BadSignature, signature_header, verify_signature
from tests.providers import INVALID_NUMBER, PUSH_TOKEN, SID, TOKEN, UNREGISTERED, WEBHOOK_SECRET


def _msg(to: str, key: str = "enr-1:1", **kw) -> RenderedMessage:
    channel, subject = kw.pop("channel", "sms"), kw.pop("subject", None)
    body = kw.pop("body", "Your order shipped")
    return RenderedMessage(key, "c1", channel, subject, body, to=to, message_id=7, **kw)


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


def _sms(http, provider) -> SmsChannel:
    return SmsChannel(http, base_url=f"{provider.url}/2010-04-01", account_sid=SID,
                      auth_token=TOKEN, sender="+15550001111")  # fmt: skip


async def test_sms_is_delivered_once_per_idempotency_key(http, provider):
    sms = _sms(http, provider)
    first = await sms.deliver(_msg("+15550002222"))
    again = await sms.deliver(_msg("+15550002222"))  # a retry of the same send
    other = await sms.deliver(_msg("+15550002222", key="enr-1:2"))
    assert first.provider_id == again.provider_id != other.provider_id
    sent = provider.by_kind("sms")
    assert [(d["To"], d["From"], d["Body"], d["key"]) for d in sent] == [
        ("+15550002222", "+15550001111", "Your order shipped", "enr-1:1"),
        ("+15550002222", "+15550001111", "Your order shipped", "enr-1:2"),
    ]
    assert provider.requests == 3


async def test_sms_errors_are_permanent_retryable_or_busy(http, provider):
    sms = _sms(http, provider)
    with pytest.raises(PermanentDeliveryError) as info:
        await sms.deliver(_msg(INVALID_NUMBER, key="bad"))
    assert info.value.code == 400 and "Invalid 'To'" in info.value.message
    assert info.value.suppress  # about the number: a hard bounce
    provider.fail_next = 1
    with pytest.raises(ProviderUnavailable) as down:  # 503: the activity retries
        await sms.deliver(_msg("+15550003333"))
    assert down.value.not_sent
    wrong = SmsChannel(http, base_url=f"{provider.url}/2010-04-01", account_sid=SID,
                       auth_token="rotated", sender="+15550001111")  # fmt: skip
    with pytest.raises(ProviderUnavailable, match="401"):  # our credentials: retried, no bounce
        await wrong.deliver(_msg("+15550003333", key="k-auth"))
    provider.busy_next = 1
    with pytest.raises(ProviderBusy) as busy:
        await sms.deliver(_msg("+15550003333"))
    assert busy.value.retry_after == 1.0
    await sms.deliver(_msg("+15550003333"))
    assert [d["To"] for d in provider.by_kind("sms")] == ["+15550003333"]


async def test_push_sends_an_fcm_style_message(http, provider):
    push = PushChannel(http, base_url=provider.url, project_id="shop", access_token=PUSH_TOKEN)
    d = await push.deliver(_msg("device-1", channel="push", subject="Sale", body="50% off"))
    (sent,) = provider.by_kind("push")
    assert sent["token"] == "device-1"
    assert sent["notification"] == {"title": "Sale", "body": "50% off"}
    assert d.provider_id == sent["name"] and sent["name"].startswith("/v1/projects/shop/")
    with pytest.raises(PermanentDeliveryError) as info:
        await push.deliver(_msg(UNREGISTERED, key="k2", channel="push"))
    assert info.value.code == 404 and info.value.suppress


async def test_webhook_is_signed_and_the_signature_is_checked(http, provider):
    hook = WebhookChannel(http, url=f"{provider.url}/hooks/in", secret=WEBHOOK_SECRET)
    await hook.deliver(_msg("ignored", channel="webhook", body="hello"))
    (sent,) = provider.by_kind("webhook")  # the provider verified the signature
    assert sent["body"]["body"] == "hello" and sent["body"]["id"] == "enr-1:1"
    wrong = WebhookChannel(http, url=f"{provider.url}/hooks/in", secret="not-the-secret")
    with pytest.raises(ProviderUnavailable, match="401"):  # a rotated secret: retried
        await wrong.deliver(_msg("ignored", key="k3", channel="webhook"))
    rejecting = WebhookChannel(http, url=f"{provider.url}/hooks/reject", secret=WEBHOOK_SECRET)
    with pytest.raises(PermanentDeliveryError) as info:  # a 422: this message fails
        await rejecting.deliver(_msg("ignored", key="k4", channel="webhook"))
    assert info.value.code == 422 and not info.value.suppress
    gone = WebhookChannel(http, url=f"{provider.url}/nowhere", secret=WEBHOOK_SECRET)
    with pytest.raises(ProviderUnavailable, match="404"):  # a wrong URL: retried
        await gone.deliver(_msg("ignored", key="k5", channel="webhook"))


def test_signature_rejects_altered_bodies_and_replays():
    body = json.dumps({"a": 1}).encode()
    now = int(time.time())
    header = signature_header("s3cret", body, now)
    verify_signature("s3cret", header, body)
    with pytest.raises(BadSignature, match="does not match"):
        verify_signature("s3cret", header, body + b" ")
    with pytest.raises(BadSignature, match="tolerance"):
        verify_signature("s3cret", header, body, now=now + 301)
    with pytest.raises(BadSignature, match="missing"):
        verify_signature("s3cret", None, body)


async def test_worker_shutdown_closes_provider_clients_and_smtp_connections(
    db, pg_url, ts_env, provider, smtp
):
    """The worker's HTTP clients (channels, webhook / hand-off calls) and pooled SMTP
    connections are closed when it shuts down, not left to the garbage collector."""
    import uuid

    from activities.channels.sandbox import provider_settings
    from core.settings import Settings
    from worker import running_worker

    recorder, port = smtp
    settings = Settings(
        database_url=pg_url,
        temporal_task_queue=f"tq-{uuid.uuid4().hex[:8]}",
        smtp_host="127.0.0.1",
        smtp_port=port,
        **provider_settings(provider),
    )
    async with running_worker(ts_env.client, db, settings) as running:
        channels = running.channels
        await channels["sms"].deliver(_msg("+15550003333"))
        await channels["email"].deliver(_msg("ann@example.com", channel="email", subject="hi"))
        ((smtp_conn, _),) = channels["email"]._idle  # kept for reuse while the worker runs
        clients = {id(c): c for c in (channels["sms"].http, running.activities.http)}
        assert smtp_conn.is_connected and not any(c.is_closed for c in clients.values())
    assert all(c.is_closed for c in clients.values())
    assert not smtp_conn.is_connected and channels["email"]._idle == []
    assert len(recorder.envelopes) == 1 and len(provider.by_kind("sms")) == 1
