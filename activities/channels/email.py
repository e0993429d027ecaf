"""Email over SMTP (aiosmtplib).

The Message-ID is derived from the send's idempotency key, not generated per attempt: every
attempt of one send (an activity retry, a worker restarted mid-send) carries the same
Message-ID, so receivers and providers that deduplicate on it show the message once.

`send_message` reserves the message under the key before calling the channel and records the
outcome after, so a completed send is never repeated. The one window SMTP cannot close: the
server accepted the message (250 after DATA) but the worker crashed or lost the connection
before the outcome was recorded. The retry sends again, with the same Message-ID; a receiver
that deduplicates on Message-ID shows it once, one that does not shows it twice.

Errors: a 5xx refusal of the recipient is classified by its enhanced status code (RFC 3463,
`refusal_kind`): about the address (5.1.x but the sender's 5.1.7 / 5.1.8, and 5.2.1 mailbox
disabled) it is a hard bounce (`PermanentDeliveryError`, the address is suppressed); about our
own setup (5.7.x relay denied, authentication, policy; the sender's 5.1.7 / 5.1.8) it is
`ProviderUnavailable` (retried, nothing suppressed: an operator fixes it); any other 5xx fails
that message only. A 5xx refusal of the message at DATA (size, content) fails that message
only. Everything else (4xx, connection errors, timeouts, 5xx answers to our login, MAIL FROM
or HELO) raises the aiosmtplib / OS error unchanged, so the activity retries.
"""

from __future__ import annotations

import hashlib
import re
import time
from email import policy
from email.message import EmailMessage
from email.utils import formatdate, parseaddr

import aiosmtplib

from activities.channels import (
    Delivery,
    PermanentDeliveryError,
    ProviderUnavailable,
    RenderedMessage,
)

__all__ = ["EmailChannel", "PermanentDeliveryError", "message_id_for"]

IDEMPOTENCY_HEADER = "X-Journeys-Idempotency-Key"
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\S)")
# Without an enhanced code: the RFC 5321 wording of a missing mailbox, and the usual variants.
_NO_MAILBOX = re.compile(
    r"mailbox (unavailable|not found|does not exist)|no such (user|mailbox|recipient)|"
    r"user unknown|unknown (user|recipient|mailbox)|(user|recipient|address) (does not exist|"
    r"not found)|invalid (recipient|mailbox)",
    re.IGNORECASE,
)
_SENDER = re.compile(r"sender", re.IGNORECASE)
_OURS = re.compile(r"relay|auth|polic|spam|block|denied|reject|sender", re.IGNORECASE)
_POLICY = policy.SMTP.clone(max_line_length=998)


def message_id_for(idempotency_key: str, sender_domain: str) -> str:
    """The Message-ID of every attempt of one send: `<sha256(key)[:32]@domain>`."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"<{digest}@{sender_domain}>"


def refusal_kind(code: int, message: str) -> str:
    """What a 5xx RCPT refusal is about: "address" (suppress it), "ours" (our relay, login,
    sender or reputation: retry), or "message" (fail this message only).

    By the enhanced status code (RFC 3463) when the reply has one of the same class; without
    one, conservatively: 550 / 551 / 553 whose text says the mailbox does not exist (and says
    nothing of relaying, authentication, policy or the sender) are about the address, anything
    else fails only this message. An address is never suppressed on a guess.
    """
    m = _ENHANCED.match(message)
    if m and int(m.group(1)) == code // 100:
        subject, detail = int(m.group(2)), int(m.group(3))
        # The sender's address or system: 5.1.7 / 5.1.8, or any address code whose text is
        # about the sender (Postfix reports sender checks at RCPT time: "5.1.0 <noreply@..>:
        # Sender address rejected"); a bad EMAIL_FROM must not suppress every customer.
        if subject == 1 and (detail in (7, 8) or _SENDER.search(message)):
            return "ours"
        if (subject, detail) == (1, 0):  # "other address status": only when it says so
            return "address" if _NO_MAILBOX.search(message) else "message"
        if subject == 1 or (subject, detail) == (2, 1):
            return "address"
        if subject == 7:  # security or policy: relay denied, authentication, DMARC...
            return "ours"
        return "message"
    if code in (550, 551, 553) and _NO_MAILBOX.search(message) and not _OURS.search(message):
        return "address"
    return "message"


def _refused(code: int, message: str, recipient: str) -> Exception:
    kind = refusal_kind(code, message)
    if kind == "ours":
        return ProviderUnavailable(
            f"email server refused recipient {recipient} for a reason about our setup: "
            f"{code} {message}",
            not_sent=True,
        )
    return PermanentDeliveryError(code, message, recipient, suppress=kind == "address")


class EmailChannel:
    name = "email"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sender: str,
        sender_domain: str,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool = False,
        start_tls: bool | None = None,
        timeout: float = 10,
        max_idle: int = 8,
        idle_seconds: float = 30,
    ) -> None:
        self.host = host
        self.port = port
        self.sender = sender
        self.sender_domain = sender_domain
        self.username = username
        self.password = password
        self.use_tls = use_tls
        self.start_tls = start_tls  # None: STARTTLS when the server offers it
        self.timeout = timeout
        # Idle connections kept for reuse, with when they went idle; servers drop idle
        # clients after a minute or more, so ours are retired sooner.
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []

    def build(self, message: RenderedMessage) -> EmailMessage:
        """The MIME message for one send (deterministic apart from Date)."""
        if not message.to:
            raise ValueError(
                f"email message {message.idempotency_key!r} has no `to` address "
                f"(customer {message.customer_id!r})"
            )
        # RFC 5322 allows 998-character lines: long URLs and keys stay readable, never folded
        # into RFC 2047 encoded words (mail clients do not decode List-Unsubscribe).
        msg = EmailMessage(policy=_POLICY)
        # Header values with CR/LF are rejected by the email policy (no header injection).
        msg["From"] = self.sender
        msg["To"] = message.to
        # A subject rendered from profile data may hold line breaks: one line, never a header.
        msg["Subject"] = " ".join((message.subject or "").split())
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = message_id_for(message.idempotency_key, self.sender_domain)
        msg[IDEMPOTENCY_HEADER] = message.idempotency_key
        if message.unsubscribe_url:
            msg["List-Unsubscribe"] = f"<{message.unsubscribe_url}>"
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"  # RFC 8058
        msg.set_content(message.body)
        if message.html:
            msg.add_alternative(message.html, subtype="html")
        return msg

    async def _connect(self) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            use_tls=self.use_tls,
            start_tls=self.start_tls,
            timeout=self.timeout,
        )
        await smtp.connect()
        try:
            if self.username:
                await smtp.login(self.username, self.password or "")
        except BaseException:
            smtp.close()
            raise
        return smtp

    async def _checkout(self) -> tuple[aiosmtplib.SMTP, bool]:
        """An idle connection young enough to trust (reused=True), else a new one."""
        now = time.monotonic()
        while self._idle:
            smtp, since = self._idle.pop()
            if smtp.is_connected and now - since < self.idle_seconds:
                return smtp, True
            smtp.close()
        return await self._connect(), False

    def _checkin(self, smtp: aiosmtplib.SMTP) -> None:
        if len(self._idle) < self.max_idle and smtp.is_connected:
            self._idle.append((smtp, time.monotonic()))
        else:
            smtp.close()

    async def aclose(self) -> None:
        while self._idle:
            smtp, _ = self._idle.pop()
            smtp.close()

    async def deliver(self, message: RenderedMessage) -> Delivery:
        """Over a reused connection when one is idle (a TLS handshake per message would cap
        throughput); a connection that failed in any way is closed, never reused."""
        try:
            msg = self.build(message)
        except ValueError as err:  # an address or header the email format cannot carry
            raise PermanentDeliveryError(0, f"invalid message: {err}", suppress=False) from err
        data = msg.as_bytes(policy=_POLICY)  # aiosmtplib would re-fold at 78 columns
        recipient = parseaddr(message.to or "")[1] or (message.to or "")
        sender = parseaddr(self.sender)[1] or self.sender
        if not recipient.isascii() or any(c.isspace() or ord(c) < 32 for c in recipient):
            # No SMTPUTF8 here: such an address can never be sent; do not retry it forever.
            raise PermanentDeliveryError(
                0, f"invalid message: address {recipient!r} cannot be sent", suppress=False
            )
        smtp, reused = await self._checkout()
        try:
            try:
                await smtp.sendmail(sender, [recipient], data)
            except aiosmtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                # The server dropped an idle connection: once more on a fresh one.
                smtp.close()
                smtp = await self._connect()
                await smtp.sendmail(sender, [recipient], data)
        except aiosmtplib.SMTPRecipientsRefused as err:
            smtp.close()
            # One recipient, so one refusal; permanent only if it is a 5xx.
            refusal = err.recipients[0] if err.recipients else None
            if refusal is not None and refusal.code >= 500:
                raise _refused(refusal.code, refusal.message, refusal.recipient) from err
            raise
        except aiosmtplib.SMTPRecipientRefused as err:
            smtp.close()
            if err.code >= 500:
                raise _refused(err.code, err.message, recipient) from err
            raise
        except aiosmtplib.SMTPDataError as err:
            smtp.close()
            if err.code >= 500:  # the message was refused (size, content), not the mailbox
                raise PermanentDeliveryError(
                    err.code, err.message, recipient, suppress=False
                ) from err
            raise
        except (ValueError, UnicodeError) as err:  # an address aiosmtplib cannot quote
            smtp.close()
            raise PermanentDeliveryError(0, f"invalid message: {err}", suppress=False) from err
        except BaseException:
            smtp.close()
            raise
        self._checkin(smtp)
        return Delivery(status="sent", provider_id=msg["Message-ID"])
