"""One small channel protocol; every provider implements it the same way.

A channel gets a rendered message that carries its idempotency key (HTTP providers deduplicate
on it, SMTP carries it as Message-ID) and answers with a Delivery, or raises:
`PermanentDeliveryError` (the provider refused the address or message for good: a bounce, never
retried), `ProviderBusy` (the provider asked us to slow down: retried after its delay), or any
other exception (an outage: retried with backoff, with the same key, so never duplicated).

`outbox` and `in_app` have no provider: the stored `messages` row is the delivery (a downstream
system reads the outbox; apps read the inbox API).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class RenderedMessage:
    idempotency_key: str
    customer_id: str
    channel: str
    subject: str | None
    body: str
    to: str | None = None  # the address on this channel (email, phone, device token)
    html: str | None = None
    unsubscribe_url: str | None = None
    message_id: int | None = None  # our `messages.id`
    journey_id: str | None = None
    step_id: str | None = None


@dataclass(frozen=True)
class Delivery:
    status: str  # sent
    provider_id: str | None = None


class PermanentDeliveryError(ValueError):
    """The provider refused the message for good: never retried. `suppress`: the refusal is
    about the address (unknown mailbox, invalid number, unregistered device), so it is a hard
    bounce and the address is suppressed; otherwise the message itself was refused (too big,
    rejected content, a 4xx about the request) and only this message fails."""

    def __init__(
        self,
        code: int | None,
        message: str,
        recipient: str | None = None,
        *,
        suppress: bool = True,
    ) -> None:
        # code: the provider's (SMTP reply, HTTP status); None when we refused it ourselves.
        self.code = code
        self.message = message
        self.recipient = recipient
        self.suppress = suppress
        where = f" for {recipient}" if recipient else ""
        super().__init__(message if code is None else f"{code}{where}: {message}")


class ProviderBusy(RuntimeError):
    """The provider rate-limited us (HTTP 429): try again after `retry_after` seconds."""

    def __init__(self, channel: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"{channel} provider is rate limiting; retry in {retry_after:.1f}s")


class ProviderUnavailable(RuntimeError):
    """Retry later: an outage, or a problem on our side (credentials, URL) that an operator
    fixes. `not_sent`: the provider certainly did not take the message (503, auth refused)."""

    def __init__(self, message: str, *, not_sent: bool) -> None:
        self.not_sent = not_sent
        super().__init__(message)


def definitely_not_sent(err: BaseException) -> bool:
    """The attempt failed before the provider could have taken the message: the send is
    pending again (not in doubt), so the contact policy is checked anew before the retry."""
    import aiosmtplib
    import httpx

    if isinstance(err, ProviderBusy | httpx.ConnectError | aiosmtplib.SMTPConnectError):
        return True
    if isinstance(err, ProviderUnavailable):
        return err.not_sent
    # Any SMTP answer that refused (greylisting and other RCPT 4xx, a login or MAIL FROM
    # refusal, a 4xx to DATA): the server did not accept the message. A dropped connection is
    # not an answer, and stays in doubt.
    return isinstance(err, aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused)


class Channel(Protocol):
    name: str

    async def deliver(self, message: RenderedMessage) -> Delivery:
        """Hand the message to the provider, carrying its idempotency key."""
        ...


class StoredChannel:
    """A channel whose delivery is the stored message itself (outbox, in-app inbox)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def deliver(self, message: RenderedMessage) -> Delivery:
        return Delivery(status="sent", provider_id=message.idempotency_key)


async def close_channels(channels: dict[str, Channel]) -> None:
    """Close what the channels hold open: pooled SMTP connections (`aclose`), and the HTTP
    client `build_channels` opened itself when it was given none. A client passed to
    `build_channels` stays its caller's to close."""
    for channel in channels.values():
        close = getattr(channel, "aclose", None)
        if close is not None:
            await close()
    for client in {id(c): c for c in _owned_clients if _uses(channels, c)}.values():
        _owned_clients.remove(client)
        await client.aclose()


def _uses(channels: dict[str, Channel], client: Any) -> bool:
    return any(getattr(c, "http", None) is client for c in channels.values())


# HTTP clients build_channels opened (no client given): close_channels closes them.
_owned_clients: list[Any] = []


def build_channels(settings: Any, http: Any = None, *, outbound: Any = None) -> dict[str, Channel]:
    """The channels this deployment has: outbox and in-app always; email, SMS, push and webhook
    when their provider is configured. Close them with `close_channels` at shutdown.

    `http` calls the operator's provider APIs (SMS, push: trusted base URLs); `outbound`, a
    `core.outbound.outbound_client`, calls the webhook channel's URL, which receives every
    message and so is checked like a journey's URLs. Either is opened here when not given."""
    channels: dict[str, Channel] = {
        "outbox": StoredChannel("outbox"),
        "in_app": StoredChannel("in_app"),
    }
    if settings.smtp_host:
        from activities.channels.email import EmailChannel

        channels["email"] = EmailChannel(
            host=settings.smtp_host,
            port=settings.smtp_port,
            sender=settings.email_from,
            sender_domain=settings.email_sender_domain,
            username=settings.smtp_username,
            password=settings.smtp_password,
            use_tls=settings.smtp_use_tls,
            start_tls=settings.smtp_start_tls,
            timeout=settings.smtp_timeout,
        )
    if settings.sms_api_url or settings.push_api_url:
        import httpx

        from activities.channels import http as providers

        client = http
        if client is None:
            client = httpx.AsyncClient(timeout=settings.provider_timeout)
            _owned_clients.append(client)
        if settings.sms_api_url:
            channels["sms"] = providers.SmsChannel(
                client,
                base_url=settings.sms_api_url,
                account_sid=settings.sms_account_sid,
                auth_token=settings.sms_auth_token,
                sender=settings.sms_from,
                status_callback=f"{settings.public_url.rstrip('/')}/v1/providers/sms/status",
            )
        if settings.push_api_url:
            channels["push"] = providers.PushChannel(
                client,
                base_url=settings.push_api_url,
                project_id=settings.push_project_id,
                access_token=settings.push_access_token,
            )
    if settings.webhook_channel_url:
        from activities.channels.http import WebhookChannel
        from core.outbound import OutboundPolicy, outbound_client

        guarded = outbound
        if guarded is None:
            guarded = outbound_client(
                OutboundPolicy.from_settings(settings), timeout=settings.provider_timeout
            )
            _owned_clients.append(guarded)
        channels["webhook"] = WebhookChannel(
            guarded, url=settings.webhook_channel_url, secret=settings.webhook_signing_secret
        )
    return channels
