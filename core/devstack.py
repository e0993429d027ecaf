"""`make dev`: the whole stack on embedded defaults, or on DATABASE_URL / TEMPORAL_ADDRESS.

PostgreSQL (data in .data/postgres), the Temporal dev server with its UI (history in
.data/temporal.db), migrations, the example journeys, local stand-ins for the message providers
unless real ones are configured (mail in .data/sandbox/mail/*.eml, SMS / push / webhook calls in
.data/sandbox/*.jsonl), then the worker and the API as child processes.

The children are supervised: one that dies (a crash, an OOM kill) is restarted with backoff
and logged (`devstack.child_exited`, `devstack.child_restarted`); the others keep running.
Ctrl-C or SIGTERM stops everything, also while starting, and exits 0; so does the death of
the parent (`make` killed). The next start reuses the data. DATA_DIR, API_PORT,
TEMPORAL_PORT, TEMPORAL_UI_PORT, DATABASE_URL and TEMPORAL_ADDRESS choose where it lives.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg

from core.embedded import find_binary, port_in_use, start_postgres, start_temporal
from core.logs import configure_logging, get_logger
from core.settings import ROOT, Settings, get_settings
from core.temporal import connect
from store.db import create_pool, migrate
from store.journeys import publish_folder

log = get_logger("devstack")

# Restart delays of a child that died (worker, API, embedded Temporal).
RESTART_MIN_DELAY = 0.5
RESTART_MAX_DELAY = 30.0
# A child that ran this long before dying starts its backoff afresh.
HEALTHY_SECONDS = 60.0
POLL_SECONDS = 0.2


def _lock(data: Path) -> int:
    data.mkdir(parents=True, exist_ok=True)
    fd = os.open(data / "dev.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode().strip() or "?"
        raise SystemExit(
            f"`make dev` is already running (pid {pid}); stop it with Ctrl-C first"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


async def publish_journeys(pool: asyncpg.Pool, folder: Path) -> dict[str, int]:
    """Publish the journeys of `folder`; a file that does not parse or validate is logged, one
    line per file (`devstack.journey_invalid file=journeys/x.yaml line=3 column=5 error=...`),
    and the stack starts with the others. Returns the versions published."""
    result = await publish_folder(pool, folder, source_root=folder.parent)
    for path, err in result.invalid.items():
        first = err.problems[0]
        log.error(
            "devstack.journey_invalid",
            file=str(path.relative_to(folder.parent)),
            line=first.position.line if first.position else None,
            column=first.position.column if first.position else None,
            # The first problem's place is in line/column; the others say their own.
            error="; ".join(
                str(replace(p, position=None) if i == 0 else p) for i, p in enumerate(err.problems)
            ),
        )
    return result.versions


async def _prepare(
    db_url: str, address: str, namespace: str, journeys: Path = ROOT / "journeys"
) -> dict[str, int]:
    await migrate(db_url)
    pool = await create_pool(db_url)
    try:
        published = await publish_journeys(pool, journeys)
    finally:
        await pool.close()
    await connect(address, namespace)  # fails early if Temporal is unreachable
    return published


def _sandbox(settings: Settings, data: Path) -> tuple[dict[str, str], list[Any]]:
    """Local providers for the channels no real provider is configured for: (env, servers)."""
    from activities.channels import sandbox

    env: dict[str, str] = {}
    servers: list[Any] = []
    if not settings.smtp_host:
        smtp = sandbox.serve_smtp(sandbox.MailSink(record_dir=data / "sandbox" / "mail"))
        servers.append(smtp)
        env |= {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp.port)}
    if not (settings.sms_api_url or settings.push_api_url or settings.webhook_channel_url):
        provider, http = sandbox.serve(record_dir=data / "sandbox")
        servers.append(http)
        env |= {k.upper(): str(v) for k, v in sandbox.provider_settings(provider).items()}
    return env, servers


class _Stop(BaseException):
    """SIGTERM / SIGINT while the stack is still starting: unwind and clean up."""


@dataclass
class _Supervised:
    """A child process that is restarted when it dies: after RESTART_MIN_DELAY, doubling
    while it keeps dying within HEALTHY_SECONDS of its start, up to RESTART_MAX_DELAY."""

    name: str
    spawn: Callable[[], subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None

    def start(self) -> None:
        self.proc = self.spawn()
        self.started = time.monotonic()
        self.restart_at = None

    def check(self) -> None:
        """Notice a death (schedule the restart) or restart when its delay has passed."""
        now = time.monotonic()
        if self.restart_at is not None:
            if now >= self.restart_at:
                try:
                    self.start()
                except (OSError, SystemExit) as err:  # e.g. Temporal did not come up: back off
                    self.failures += 1
                    delay = min(RESTART_MIN_DELAY * 2 ** (self.failures - 1), RESTART_MAX_DELAY)
                    self.restart_at = now + delay
                    log.error("devstack.restart_failed", child=self.name, error=str(err),
                              restart_in=delay)  # fmt: skip
                    return
                assert self.proc is not None
                log.warning("devstack.child_restarted", child=self.name, pid=self.proc.pid)
            return
        assert self.proc is not None
        code = self.proc.poll()
        if code is None:
            return
        self.failures = self.failures + 1 if now - self.started < HEALTHY_SECONDS else 1
        delay = min(RESTART_MIN_DELAY * 2 ** (self.failures - 1), RESTART_MAX_DELAY)
        self.restart_at = now + delay
        log.error("devstack.child_exited", child=self.name, code=code, restart_in=delay)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    settings = get_settings()
    configure_logging("console" if sys.stderr.isatty() else settings.log_format)
    # SIGTERM stops the stack as Ctrl-C does: while starting, by unwinding through the
    # clean-up below; once running, at the next turn of the supervision loop.
    state = {"running": False, "stop": False}

    def _on_signal(signum: int, _frame: object) -> None:
        if not state["running"]:
            raise _Stop(signum)
        state["stop"] = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    parent = os.getppid()
    data = settings.data_dir
    _lock_fd = _lock(data)
    if port_in_use(settings.api_port):
        raise SystemExit(f"port {settings.api_port} (API_PORT) is already in use")
    children: list[_Supervised] = []
    sandboxes: list[Any] = []
    pg = None
    try:
        db_url = settings.database_url
        if not db_url:
            pg, db_url = start_postgres(data / "postgres")
            log.info("postgres.started", datadir=str(data / "postgres"))
        address = settings.temporal_address
        if not address:
            temporal = _Supervised(
                "temporal",
                lambda: start_temporal(
                    data / "temporal.db",
                    port=settings.temporal_port,
                    ui_port=settings.temporal_ui_port,
                    namespace=settings.temporal_namespace,
                    log=data / "temporal.log",
                ),
            )
            children.append(temporal)
            temporal.start()
            address = f"127.0.0.1:{settings.temporal_port}"
            log.info("temporal.started", address=address)
        published = asyncio.run(_prepare(db_url, address, settings.temporal_namespace))
        log.info("journeys.published", versions=published)
        providers, sandboxes = _sandbox(settings, data)
        if providers:
            log.info("sandbox.started", folder=str(data / "sandbox"), settings=providers)
        env = {
            **os.environ,
            # The dev defaults of core/settings.py are allowed, unless the caller said otherwise.
            "JOURNEYS_ENV": os.environ.get("JOURNEYS_ENV") or "development",
            "DATABASE_URL": db_url,
            "TEMPORAL_ADDRESS": address,
            **providers,
        }
        api_cmd = [
            find_binary("uvicorn"),
            "api.main:app",
            "--host",
            settings.api_host,
            "--port",
            str(settings.api_port),
            "--no-access-log",
        ]
        children += [
            _Supervised(
                "worker",
                lambda: subprocess.Popen([sys.executable, str(ROOT / "worker.py")], env=env),
            ),
            _Supervised("api", lambda: subprocess.Popen(api_cmd, env=env, cwd=ROOT)),
        ]
        for child in children[-2:]:
            child.start()
        _banner(settings, data, bool(providers))
        state["running"] = True
        while not state["stop"]:
            for child in children:
                child.check()
            if os.getppid() != parent:  # `make` was killed: nobody would stop us any more
                log.warning("devstack.parent_gone")
                break
            time.sleep(POLL_SECONDS)
    except (_Stop, KeyboardInterrupt):
        log.info("devstack.stopping")
    finally:
        state["running"] = True  # a second signal no longer interrupts the clean-up
        for child in reversed(children):
            child.terminate()
        for child in reversed(children):
            child.wait()
        for server in sandboxes:
            server.shutdown() if hasattr(server, "shutdown") else server.stop()
        if pg is not None:
            pg.cleanup()  # cleanup_mode="stop": stops the server, keeps the data
        log.info("devstack.stopped")


def workflow_list_line(settings: Settings, query: str) -> str:
    """The exact CLI line an operator pastes to list runs (the venv's `temporal`, this stack's
    address and namespace): `make dev` prints one, the README shows the same."""
    address = settings.temporal_address or f"127.0.0.1:{settings.temporal_port}"
    binary = Path(sys.executable).parent / "temporal"
    try:
        shown = str(binary.relative_to(ROOT))
    except ValueError:
        shown = str(binary)
    namespace = (
        f" --namespace {settings.temporal_namespace}"
        if settings.temporal_namespace != "default"
        else ""
    )
    return f"{shown} workflow list --address {address}{namespace} --query '{query}'"


def _banner(settings: Settings, data: Path, providers: bool) -> None:
    api = f"http://{settings.api_host}:{settings.api_port}"
    ui = (
        f"http://127.0.0.1:{settings.temporal_ui_port}"
        if not settings.temporal_address
        else "(external Temporal: its own UI)"
    )
    messages = (
        f"  Messages     {data / 'sandbox'} (local providers: mail/*.eml, sms.jsonl, "
        "push.jsonl, webhook.jsonl)\n"
        if providers
        else ""
    )
    by_customer = workflow_list_line(settings, 'CustomerRefs="u1"')
    with_failures = workflow_list_line(settings, 'JourneyStatus="completed_with_failures"')
    print(
        f"\n  API docs     {api}/docs\n  Temporal UI  {ui}\n  Write key    "
        f"{settings.journeys_write_key}\n  Admin key    {settings.journeys_admin_key}\n"
        f"{messages}"
        f"  Runs of a customer (userId, anonymousId or email):\n    {by_customer}\n"
        f"  Runs that failed a send:\n    {with_failures}\n"
        f"  Try:  curl -u {settings.journeys_write_key}: {api}/v1/track -H "
        '\'content-type: application/json\' -d \'{"userId":"u1","event":"Product Added",'
        '"properties":{"name":"Mug"}}\'\n\n  Ctrl-C (or SIGTERM) stops everything; a worker or '
        "API that dies is restarted.\n",
        flush=True,
    )


if __name__ == "__main__":
    main()
