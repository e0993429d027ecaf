"""One throwaway stack for a bench run: embedded PostgreSQL, Temporal dev server, worker, API.

Everything lives in one temp dir that is removed at the end; `stop()` is safe to call at any
point (also half-way through `start()`), and more than once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.embedded import (
    spawn_api,
    spawn_worker,
    start_postgres,
    start_temporal,
    wait_for_health,
)

WRITE_KEY = "bench-write-key"
ADMIN_KEY = "bench-admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_IDS = re.compile(r"[0-9a-f]{8}-[0-9a-f-]{27,}|[0-9a-f]{16,}|\b\d+(\.\d+)?\b")


def _mask(text: str) -> str:
    return _IDS.sub("#", text)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Stack:
    keep_logs: Path | None = None
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="journeys-bench-")))
    task_queue: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:8]}")
    api_port: int = field(default_factory=free_port)
    temporal_port: int = 0
    db_url: str = ""
    pg: Any = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _stopped: bool = False

    @property
    def logs(self) -> Path:
        return self.tmp / "logs"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.temporal_port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            # A throwaway local stack: its development secrets are allowed (core.settings).
            "JOURNEYS_ENV": "development",
            "DATABASE_URL": self.db_url,
            "TEMPORAL_ADDRESS": self.temporal_address,
            "TEMPORAL_TASK_QUEUE": self.task_queue,
            "JOURNEYS_WRITE_KEY": WRITE_KEY,
            "JOURNEYS_ADMIN_KEY": ADMIN_KEY,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "WARNING",
        }

    # -- servers -------------------------------------------------------------------
    def start_servers(self) -> None:
        """PostgreSQL (not yet migrated) and the Temporal dev server on free ports."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg, self.db_url = start_postgres(self.tmp / "pgdata")
        self.temporal_port = free_port()
        self.procs["temporal"] = start_temporal(
            self.tmp / "temporal.db",
            port=self.temporal_port,
            ui_port=free_port(),
            log=self.logs / "temporal.log",
        )

    def start_app(self) -> None:
        """`python worker.py` and one uvicorn process, as in production; waits for /health."""
        env = self.env()
        with open(self.logs / "worker.log", "ab") as out:
            self.procs["worker"] = spawn_worker(env, out)
        with open(self.logs / "api.log", "ab") as out:
            self.procs["api"] = spawn_api(env, self.api_port, out)
        wait_for_health(self.api_url, within=60, alive=self.check_alive)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.logs / f"{name}.log"
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; last lines of {log}:\n{_tail(log)}"
                )

    def pids(self) -> dict[str, int]:
        out = {name: p.pid for name, p in self.procs.items() if p.poll() is None}
        with contextlib.suppress(Exception):
            out["postgres"] = int(self.pg.get_pid())
        return out

    def log_problems(self, top: int = 12) -> dict[str, Any]:
        """Digest of each app log (LOG_LEVEL=WARNING keeps only problems): counts per level and
        the most frequent messages, ids masked, with the last line of any exception."""
        out: dict[str, Any] = {}
        for name in ("worker", "api"):
            text = ""
            with contextlib.suppress(OSError):
                text = (self.logs / f"{name}.log").read_text(errors="replace")
            levels: dict[str, int] = {}
            messages: dict[str, int] = {}
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                if isinstance(rec, dict):
                    level = str(rec.get("level", "?")).lower()
                    msg = str(rec.get("event", ""))
                    exc = str(rec.get("exception") or "").strip().splitlines()
                    if exc:
                        msg += " | " + exc[-1]
                elif line[:1].isspace() or not line.strip():
                    continue  # inside a traceback printed as text
                else:
                    level, msg = "text", line
                levels[level] = levels.get(level, 0) + 1
                key = f"{level}: {_mask(msg)[:300]}"
                messages[key] = messages.get(key, 0) + 1
            common = sorted(messages.items(), key=lambda kv: -kv[1])[:top]
            out[name] = {"lines": sum(levels.values()), "levels": levels, "top": dict(common)}
        return out

    def log_samples(self, name: str, lines: int = 5) -> str:
        return _tail(self.logs / f"{name}.log", lines)

    # -- teardown ------------------------------------------------------------------
    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        # The app first (it talks to both servers), then Temporal, then PostgreSQL.
        for group in (("api", "worker"), ("temporal",)):
            procs = [(n, self.procs[n]) for n in group if n in self.procs]
            for _, proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
            for _, proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
        self.procs.clear()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.cleanup()
        if self.keep_logs is not None and self.logs.exists():
            with contextlib.suppress(OSError):
                shutil.copytree(self.logs, self.keep_logs, dirs_exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
