"""`make dev`: the whole stack on embedded defaults, or on DATABASE_URL / TEMPORAL_ADDRESS.

PostgreSQL (data in .data/postgres), the Temporal dev server with its UI (history in
.data/temporal.db), migrations, the example journeys, local stand-ins for the message providers
unless real ones are configured (mail in .data/sandbox/mail/*.eml, SMS / push / webhook calls in
.data/sandbox/*.jsonl), then the worker and the API as child processes. Ctrl-C stops
everything; the next start reuses the data.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from core.embedded import find_binary, port_in_use, start_postgres, start_temporal
from core.logs import configure_logging, get_logger
from core.settings import ROOT, Settings, get_settings
from core.temporal import connect
from store.db import create_pool, migrate
from store.journeys import publish_folder

log = get_logger("devstack")


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


async def _prepare(db_url: str, address: str, namespace: str) -> dict[str, int]:
    await migrate(db_url)
    pool = await create_pool(db_url)
    try:
        published = await publish_folder(pool, ROOT / "journeys")
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


def main() -> None:
    settings = get_settings()
    configure_logging("console" if sys.stderr.isatty() else settings.log_format)
    data = settings.data_dir
    _lock_fd = _lock(data)
    if port_in_use(settings.api_port):
        raise SystemExit(f"port {settings.api_port} (API_PORT) is already in use")
    children: list[subprocess.Popen[bytes]] = []
    sandboxes: list[Any] = []
    pg = None
    try:
        db_url = settings.database_url
        if not db_url:
            pg, db_url = start_postgres(data / "postgres")
            log.info("postgres.started", datadir=str(data / "postgres"))
        address = settings.temporal_address
        if not address:
            children.append(
                start_temporal(
                    data / "temporal.db",
                    port=settings.temporal_port,
                    ui_port=settings.temporal_ui_port,
                    namespace=settings.temporal_namespace,
                    log=data / "temporal.log",
                )
            )
            address = f"127.0.0.1:{settings.temporal_port}"
            log.info("temporal.started", address=address)
        published = asyncio.run(_prepare(db_url, address, settings.temporal_namespace))
        log.info("journeys.published", versions=published)
        providers, sandboxes = _sandbox(settings, data)
        if providers:
            log.info("sandbox.started", folder=str(data / "sandbox"), settings=providers)
        env = {
            **os.environ,
            "JOURNEYS_ENV": "development",  # the dev defaults of core/settings.py are allowed
            "DATABASE_URL": db_url,
            "TEMPORAL_ADDRESS": address,
            **providers,
        }
        children.append(subprocess.Popen([sys.executable, str(ROOT / "worker.py")], env=env))
        children.append(
            subprocess.Popen(
                [
                    find_binary("uvicorn"),
                    "api.main:app",
                    "--host",
                    settings.api_host,
                    "--port",
                    str(settings.api_port),
                    "--no-access-log",
                ],
                env=env,
                cwd=ROOT,
            )
        )
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
        print(
            f"\n  API docs     {api}/docs\n  Temporal UI  {ui}\n  Write key    "
            f"{settings.journeys_write_key}\n  Admin key    {settings.journeys_admin_key}\n"
            f"{messages}"
            f"  Try:  curl -u {settings.journeys_write_key}: {api}/v1/track -H "
            '\'content-type: application/json\' -d \'{"userId":"u1","event":"Product Added",'
            '"properties":{"name":"Mug"}}\'\n\n  Ctrl-C stops everything.\n',
            flush=True,
        )
        stop = {"now": False}

        def _stop(*_: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        while not stop["now"]:
            for child in children:
                if child.poll() is not None:
                    log.error("devstack.child_exited", cmd=child.args[:2], code=child.returncode)
                    stop["now"] = True
            signal.sigtimedwait([signal.SIGINT, signal.SIGTERM], 0.5)
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in reversed(children):
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        for server in sandboxes:
            server.shutdown() if hasattr(server, "shutdown") else server.stop()
        if pg is not None:
            pg.cleanup()  # cleanup_mode="stop": stops the server, keeps the data
        log.info("devstack.stopped")


if __name__ == "__main__":
    main()
