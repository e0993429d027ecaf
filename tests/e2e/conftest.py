"""Real processes: `python worker.py` and the API under uvicorn, as in production."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from temporalio.testing import WorkflowEnvironment

from core.embedded import spawn_api, spawn_worker, wait_for_health

WRITE_KEY = "e2e-write-key"
ADMIN_KEY = "e2e-admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    db_url: str
    temporal_address: str
    task_queue: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:8]}")
    api_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DATABASE_URL": self.db_url,
            "TEMPORAL_ADDRESS": self.temporal_address,
            "TEMPORAL_TASK_QUEUE": self.task_queue,
            "JOURNEYS_WRITE_KEY": WRITE_KEY,
            "JOURNEYS_ADMIN_KEY": ADMIN_KEY,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "WARNING",
        }

    def start_worker(self) -> None:
        self.procs["worker"] = spawn_worker(self.env())

    def start_api(self) -> None:
        self.procs["api"] = spawn_api(self.env(), self.api_port)
        wait_for_health(self.api_url, within=30, alive=self._api_alive)

    def _api_alive(self) -> None:
        if self.procs["api"].poll() is not None:
            raise RuntimeError("the API exited while starting")

    def kill(self, name: str) -> None:
        """SIGKILL: no shutdown hooks, no flushing."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


@pytest.fixture
def stack(db, pg_url: str, dev_env: WorkflowEnvironment) -> Iterator[Stack]:
    s = Stack(pg_url, dev_env.client.service_client.config.target_host)
    yield s
    s.stop_all()


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}
