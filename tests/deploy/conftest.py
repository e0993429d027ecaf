"""docker-compose.yml requires its secrets (`${VAR:?...}`): the compose tests give it
placeholder values, as an operator's environment would."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

COMPOSE_SECRETS = {
    "JOURNEYS_WRITE_KEY": "compose-test-write-key",
    "JOURNEYS_ADMIN_KEY": "compose-test-admin-key",
    "LINK_SECRET": "compose-test-link-secret",
    "WEBHOOK_SIGNING_SECRET": "compose-test-webhook-secret",
}


@pytest.fixture(scope="module", autouse=True)
def compose_secrets() -> Iterator[dict[str, str]]:
    saved = {k: os.environ.get(k) for k in COMPOSE_SECRETS}
    os.environ.update(COMPOSE_SECRETS)
    yield COMPOSE_SECRETS
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
