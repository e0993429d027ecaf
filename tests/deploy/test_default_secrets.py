"""Outside development and tests, no process runs with a secret everyone knows.

The API and the worker are started as real subprocesses with JOURNEYS_ENV=production and one
secret left at its default (or empty): each exits non-zero, naming the variable. The database and
Temporal addresses point nowhere: the refusal comes before any connection. docker-compose.yml
refuses to render without the secrets and publishes Temporal (no auth of its own) on localhost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.embedded import find_binary
from core.settings import InsecureSecrets, Settings, require_secrets
from tests.deploy.test_compose import _compose, _require_compose

ROOT = Path(__file__).resolve().parents[2]
GOOD = {
    "JOURNEYS_WRITE_KEY": "w-4b1f9e0c7d2a",
    "JOURNEYS_ADMIN_KEY": "a-93c5e1f07b6d",
    "LINK_SECRET": "l-0e8d7c6b5a49",
    "WEBHOOK_SIGNING_SECRET": "h-5f4e3d2c1b0a",
}
SECRETS = tuple(GOOD)


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in GOOD and not k.startswith("SMS_")}
    env.update(
        JOURNEYS_ENV="production",
        DATABASE_URL="postgresql://nobody@127.0.0.1:9/nowhere",
        TEMPORAL_ADDRESS="127.0.0.1:9",
        LOG_FORMAT="json",
        **GOOD,
    )
    env.update(overrides)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def _api(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return _run([find_binary("uvicorn"), "api.main:app", "--port", "0"], env)


def _worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "worker.py"], env)


def test_api_refuses_the_default_admin_key() -> None:
    proc = _api(_env(JOURNEYS_ADMIN_KEY="dev-admin-key"))
    assert proc.returncode != 0
    assert "JOURNEYS_ADMIN_KEY" in proc.stderr, proc.stderr
    assert "LINK_SECRET" not in proc.stderr  # only what is wrong is named


def test_api_refuses_an_empty_link_secret() -> None:
    proc = _api(_env(LINK_SECRET=""))
    assert proc.returncode != 0
    assert "LINK_SECRET" in proc.stderr, proc.stderr


def test_worker_refuses_the_default_webhook_secret() -> None:
    proc = _worker(_env(WEBHOOK_SIGNING_SECRET="dev-webhook-secret"))
    assert proc.returncode != 0
    assert "WEBHOOK_SIGNING_SECRET" in proc.stderr, proc.stderr


def test_worker_with_nothing_configured_names_every_secret() -> None:
    env = {k: v for k, v in _env().items() if k not in GOOD}
    proc = _worker(env)
    assert proc.returncode != 0
    for name in SECRETS:
        assert name in proc.stderr, proc.stderr


def _settings(**fields: object) -> Settings:
    values = {k.lower(): v for k, v in GOOD.items()}
    values.update(fields)
    return Settings(journeys_env="production", **values)  # type: ignore[arg-type]


def test_own_secrets_pass_and_development_is_exempt() -> None:
    require_secrets(_settings(), "the API")
    for env in ("development", "test"):
        require_secrets(Settings(journeys_env=env), "the API")  # type: ignore[arg-type]
    dev = {
        "journeys_write_key": "dev-write-key",
        "journeys_admin_key": "dev-admin-key",
        "link_secret": "dev-link-secret",
        "webhook_signing_secret": "dev-webhook-secret",
    }
    with pytest.raises(InsecureSecrets) as refused:
        require_secrets(_settings(**dev), "the API")
    for name in SECRETS:
        assert name in str(refused.value)


def test_one_default_among_several_write_keys_is_refused() -> None:
    with pytest.raises(InsecureSecrets, match="JOURNEYS_WRITE_KEY"):
        require_secrets(_settings(journeys_write_key="mine-1234,dev-write-key"), "the API")


def test_provider_tokens_are_checked_when_their_channel_is_on() -> None:
    assert _settings().insecure_secrets() == []  # no SMS or push channel: tokens unused
    sms = _settings(sms_api_url="https://api.twilio.example")
    assert sms.insecure_secrets() == ["SMS_AUTH_TOKEN"]
    push = _settings(push_api_url="https://fcm.example", push_access_token="")
    assert push.insecure_secrets() == ["PUSH_ACCESS_TOKEN"]
    assert _settings(sms_api_url="https://x", sms_auth_token="t-8c1d").insecure_secrets() == []


@pytest.mark.parametrize("name", SECRETS)
def test_compose_requires_each_secret(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_compose()
    monkeypatch.delenv(name, raising=False)
    proc = _compose("config", "-q")
    # (The pip `docker-compose` wrapper drops the exit code of the binary it runs: the message
    # is the reliable part.)
    assert f"required variable {name} is missing" in proc.stderr, proc.stderr


def test_compose_runs_production_and_keeps_temporal_local() -> None:
    _require_compose()
    proc = _compose("config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    for name in ("api", "worker"):
        assert services[name]["environment"]["JOURNEYS_ENV"] == "production"
    for name in ("temporal", "temporal-ui"):
        for port in services[name].get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} published without auth: {port}"
