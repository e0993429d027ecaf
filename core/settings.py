"""The one settings object, read from the environment (and `.env` if present)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent


# The fixed values below make `make dev` and the tests work with no configuration; anywhere
# else they are known to everyone who read this file, so `require_secrets` refuses them.
DEV_SECRETS = frozenset(
    {
        "dev-write-key",
        "dev-admin-key",
        "dev-link-secret",
        "dev-webhook-secret",
        "dev-sms-token",
        "dev-push-token",
    }
)


class InsecureSecrets(RuntimeError):
    """A secret is empty or a published default outside development; names each variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # Where this process runs. Only `development` (`make dev`) and `test` (the test suite) may
    # use the built-in default secrets; the default is `production` so that a deployment that
    # forgot to say anything fails closed instead of running with published secrets.
    journeys_env: Literal["development", "test", "production"] = "production"

    database_url: str | None = Field(
        default=None,
        description="postgresql://user:pass@host/db; unset in dev = embedded PostgreSQL",
    )
    temporal_address: str | None = Field(
        default=None, description="host:port of Temporal; unset in dev = embedded dev server"
    )
    temporal_namespace: str = "default"
    temporal_task_queue: str = "journeys"
    temporal_ui_port: int = 8233
    temporal_port: int = 7233
    journeys_write_key: str = "dev-write-key"
    journeys_admin_key: str = "dev-admin-key"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    data_dir: Path = ROOT / ".data"
    log_format: str = Field(default="auto", description="json | console | auto (json off a TTY)")
    log_level: str = "INFO"
    # Contact policy: marketing messages per customer, across journeys ("N/window"), and per
    # channel ("email=2/1d,sms=1/1d"); consent when a customer never said (subscribed |
    # unsubscribed, i.e. opt-out or opt-in).
    frequency_cap: str = "3/7d"
    channel_frequency_caps: str = ""
    consent_default: str = "subscribed"
    # Links in messages (unsubscribe): the API's public base URL and the key that signs them.
    public_url: str = "http://127.0.0.1:8000"
    link_secret: str = "dev-link-secret"
    # Email channel (SMTP); unset smtp_host = no email channel.
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_use_tls: bool = False  # implicit TLS (usually port 465)
    smtp_start_tls: bool | None = None  # None = STARTTLS when the server offers it
    smtp_timeout: float = 10
    email_from: str = "Journeys <noreply@localhost>"
    email_sender_domain: str = "localhost"  # right-hand side of Message-ID
    # SMS over a Twilio-style REST API (POST {sms_api_url}/Accounts/{sid}/Messages.json, basic
    # auth sid:token, form To/From/Body); unset sms_api_url = no SMS channel. The auth token
    # also verifies the provider's signed callbacks (X-Twilio-Signature).
    sms_api_url: str | None = None
    sms_account_sid: str = "AC-dev"
    sms_auth_token: str = "dev-sms-token"
    sms_from: str = "+15550000000"
    # Mobile push over an FCM-style HTTP v1 API (POST {push_api_url}/v1/projects/{project}/
    # messages:send, bearer token); unset push_api_url = no push channel.
    push_api_url: str | None = None
    push_project_id: str = "journeys-dev"
    push_access_token: str = "dev-push-token"
    # Webhook channel: every message POSTed as signed JSON to this URL; unset = no channel.
    webhook_channel_url: str | None = None
    # Outbound calls to URLs in journeys and the webhook channel (core.outbound): may they
    # reach loopback, link-local (cloud metadata), private and reserved addresses? Unset =
    # yes only when JOURNEYS_ENV is development or test, so a deployment fails closed.
    outbound_allow_private: bool | None = None
    # Hosts and CIDRs allowed even when private addresses are not ("crm.internal,10.2.0.0/16").
    outbound_allowed: str = ""
    # Signs outgoing webhooks (Journeys-Signature: t=..,v1=HMAC-SHA256(t.body)) and verifies
    # provider delivery/bounce callbacks sent to us in the same scheme.
    webhook_signing_secret: str = "dev-webhook-secret"
    webhook_tolerance_seconds: int = 300
    # Verifies delivery/bounce callbacks from providers (POST /v1/providers/{channel}/events),
    # signed the same way; unset = that endpoint is off. Not the outgoing secret: receivers
    # of our webhooks must not be able to replay them to us.
    provider_callback_secret: str | None = None
    # Per-provider send rate (messages/s across all workers), e.g. "email=50,sms=10"; over
    # it, the send activity is retried later instead of calling the provider.
    channel_rate_limits: str = ""
    provider_timeout: float = 10
    # Outbox relay: how many stored events it routes per round.
    router_batch_size: int = 2000
    # Continue-as-new once the run's history has this many events (server suggests at 4096).
    journey_history_limit: int = 2000

    # Request bodies on every route that does not read (and limit) its own: management
    # routes, unsubscribe pages. The event routes keep their Segment limits.
    max_request_bytes: int = 1024 * 1024
    # API keys stored in PostgreSQL are cached per API process and reloaded on every change
    # (NOTIFY) and at least this often, in case a notification was missed.
    api_keys_refresh_seconds: float = 10.0

    @field_validator("outbound_allow_private", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`OUTBOUND_ALLOW_PRIVATE=` (compose's `${OUTBOUND_ALLOW_PRIVATE:-}`) means unset."""
        return None if value == "" else value

    @property
    def write_keys(self) -> set[str]:
        return {k.strip() for k in self.journeys_write_key.split(",") if k.strip()}

    def insecure_secrets(self) -> list[str]:
        """Environment variables whose secret is empty or a published default (in use)."""
        checks: list[tuple[str, list[str]]] = [
            ("JOURNEYS_WRITE_KEY", self.journeys_write_key.split(",")),
            ("JOURNEYS_ADMIN_KEY", [self.journeys_admin_key]),
            ("LINK_SECRET", [self.link_secret]),
            ("WEBHOOK_SIGNING_SECRET", [self.webhook_signing_secret]),
        ]
        # A provider's token only matters when its channel is configured.
        if self.sms_api_url:
            checks.append(("SMS_AUTH_TOKEN", [self.sms_auth_token]))
        if self.push_api_url:
            checks.append(("PUSH_ACCESS_TOKEN", [self.push_access_token]))
        return [
            name
            for name, values in checks
            if not any(v.strip() for v in values)
            or any(v.strip() in DEV_SECRETS for v in values if v.strip())
        ]


def require_secrets(settings: Settings, process: str) -> None:
    """Refuse to start outside development and tests with an empty or default secret.

    Raises:
        InsecureSecrets: naming every offending variable, so one restart fixes them all.
    """
    if settings.journeys_env != "production":
        return
    bad = settings.insecure_secrets()
    if bad:
        raise InsecureSecrets(
            f"{process} refuses to start: {', '.join(bad)} must be set to a secret of your own "
            "(empty or the published development default); JOURNEYS_ENV=development is only "
            "for `make dev`"
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()


def asyncpg_dsn(url: str) -> str:
    """The plain libpq form asyncpg accepts (drops a SQLAlchemy `+driver`)."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def sqlalchemy_url(url: str) -> str:
    if url.startswith("postgresql+asyncpg://"):
        return url
    return url.replace("postgresql://", "postgresql+asyncpg://", 1).replace(
        "postgres://", "postgresql+asyncpg://", 1
    )
