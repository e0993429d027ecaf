"""`make dev` (core.devstack) as a real process: it restarts a worker that died, and SIGTERM
stops it cleanly (exit 0, no child left), as Ctrl-C does.

Fast: the devstack runs on the test session's PostgreSQL (a fresh database of its own) and
Temporal dev server (DATABASE_URL / TEMPORAL_ADDRESS), with its data dir and API port free."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
from temporalio.testing import WorkflowEnvironment

from core.settings import ROOT
from tests.conftest import eventually
from tests.e2e.conftest import ADMIN_KEY, WRITE_KEY, free_port


def _children(pid: int) -> dict[int, str]:
    """Live child processes of `pid`: pid → command line."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out[int(entry.name)] = cmdline
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def _start_devstack(env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
    """`make dev`'s command, in its own session (the test can always kill what is left)."""
    return subprocess.Popen(
        [sys.executable, "-m", "core.devstack"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def _fresh_database(pg_url: str) -> str:
    name = f"devstack_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return urlsplit(pg_url)._replace(path=f"/{name}").geturl()


async def test_a_killed_worker_is_restarted_and_sigterm_stops_everything(
    pg_url: str, dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    db_url = await _fresh_database(pg_url)
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
        "TEMPORAL_TASK_QUEUE": f"dev-{uuid.uuid4().hex[:8]}",
        "DATA_DIR": str(tmp_path / "data"),
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "JOURNEYS_WRITE_KEY": WRITE_KEY,
        "JOURNEYS_ADMIN_KEY": ADMIN_KEY,
        "LOG_FORMAT": "json",
    }
    log = (tmp_path / "devstack.log").open("wb")
    dev = _start_devstack(env, log)
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        api = f"http://127.0.0.1:{port}"

        async def healthy() -> bool:
            assert dev.poll() is None, (tmp_path / "devstack.log").read_text()
            try:
                async with httpx.AsyncClient() as c:
                    return (await c.get(f"{api}/health", timeout=1)).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(healthy, within=60, what="the devstack's API")

        def workers() -> list[int]:
            return [p for p, cmd in _children(dev.pid).items() if "worker.py" in cmd]

        (first,) = workers()
        os.kill(first, signal.SIGKILL)

        async def restarted() -> int | None:
            assert dev.poll() is None, "the devstack stopped when its worker died"
            found = [p for p in workers() if p != first]
            return found[0] if found else None

        second = await eventually(restarted, what="a new worker process")
        assert not _alive(first)

        message_id = f"m-{uuid.uuid4()}"
        async with httpx.AsyncClient(auth=(WRITE_KEY, "")) as c:
            r = await c.post(
                f"{api}/v1/identify",
                json={"userId": "u1", "traits": {"email": "u1@example.com"},
                      "messageId": message_id},
            )  # fmt: skip
            assert r.status_code == 200, r.text

        async def routed() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT routed_at IS NOT NULL FROM events WHERE message_id = $1", message_id
                )
            )

        await eventually(routed, what="the event routed by the restarted worker")
        children = list(_children(dev.pid))
        assert second in children and len(children) >= 2  # the worker and the API

        dev.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(dev.wait, 30)
        assert code == 0, (tmp_path / "devstack.log").read_text()
        assert [p for p in children if _alive(p)] == []
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()
        await pool.close()
        log.close()
