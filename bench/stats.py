"""Percentiles, per-process CPU accounting (from /proc) and machine facts."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from core.settings import ROOT

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def pct(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), like numpy's default."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float], digits: int = 2) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(values)}
    for name, q in (("min", 0), ("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("max", 100)):
        v = pct(values, q)
        out[name] = round(v, digits) if v is not None else None
    out["mean"] = round(sum(values) / len(values), digits)
    return out


# -- CPU per process group ---------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, float, float]]:
    """pid -> (ppid, own cpu s, reaped-children cpu s)."""
    out: dict[int, tuple[int, float, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        ppid = int(fields[1])
        own = (int(fields[11]) + int(fields[12])) / _TICK
        reaped = (int(fields[13]) + int(fields[14])) / _TICK
        out[int(entry)] = (ppid, own, reaped)
    return out


def cpu_snapshot(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each root process and all its descendants."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    all_roots = set(roots.values())
    for name, root in roots.items():
        if root not in table:
            continue
        # Exited children (postgres backends) were reaped into the root's counters; for the
        # bench process those would be other roots, which are counted on their own.
        total = table[root][2] if name != "bench" else 0.0
        stack = [root]
        while stack:
            pid = stack.pop()
            total += table[pid][1]
            stack.extend(c for c in children.get(pid, []) if c not in all_roots)
        out[name] = total
    return out


def _machine_cpu() -> tuple[float, float]:
    """(busy, iowait) CPU seconds of the whole machine since boot, from /proc/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        user, nice, system, _idle, iowait, irq, softirq, steal = f[:8]
        return (user + nice + system + irq + softirq + steal) / _TICK, iowait / _TICK
    return 0.0, 0.0


class CpuMeter:
    """CPU seconds per process group between `start()` and `stop()`, and the machine's.

    `others_cores_busy` is what processes outside this run used meanwhile (the machine is
    shared: anything above ~0.1 means the figures were measured under interference)."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = {"bench": os.getpid(), **roots}
        self._t0 = 0.0
        self._c0: dict[str, float] = {}
        self._m0 = (0.0, 0.0)

    def start(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._c0 = cpu_snapshot(self.roots)
        self._m0 = _machine_cpu()
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self._t0
        c1 = cpu_snapshot(self.roots)
        m1 = _machine_cpu()
        used = {k: round(c1[k] - self._c0.get(k, 0.0), 2) for k in c1}
        total = round(sum(used.values()), 2)
        cores = os.cpu_count() or 1
        machine = m1[0] - self._m0[0]
        return {
            "machine_cores_busy": round(machine / wall, 2) if wall else None,
            "others_cores_busy": round(max(0.0, machine - total) / wall, 2) if wall else None,
            "iowait_cores": round((m1[1] - self._m0[1]) / wall, 2) if wall else None,
            "wall_s": round(wall, 2),
            "cpu_s": used,
            "cpu_s_total": total,
            "cores_busy": {k: round(v / wall, 2) for k, v in used.items()} if wall else {},
            "machine_utilisation": round(total / wall / cores, 3) if wall else None,
        }


# -- machine facts -------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _mem_total_mib() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return None


def _git_commit() -> str | None:
    """The checked-out commit, read from .git (no git command is run)."""
    git = ROOT / ".git"
    with contextlib.suppress(OSError):
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        path = git / ref
        if path.exists():
            return path.read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    return None


def machine_info(temporal_bin: str | None) -> dict[str, Any]:
    cli = None
    if temporal_bin:
        with contextlib.suppress(Exception):
            cli = subprocess.run(
                [temporal_bin, "--version"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_mib": _mem_total_mib(),
        "loadavg_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "temporalio": _version("temporalio"),
        "temporal_cli": cli,
        "fastapi": _version("fastapi"),
        "uvicorn": _version("uvicorn"),
        "asyncpg": _version("asyncpg"),
        "httpx": _version("httpx"),
        "pydantic": _version("pydantic"),
        "uvloop": _version("uvloop"),
        "git_commit": _git_commit(),
    }


async def quiesce(
    roots: dict[str, int],
    names: list[str],
    *,
    limit_s: float,
    idle_cores: float,
    hold_s: float = 2.0,
    interval: float = 0.5,
    extra: Callable[[], Awaitable[bool]] | None = None,
) -> dict[str, Any]:
    """Wait (bounded) until the named processes together use < `idle_cores` for `hold_s`.

    This is how the bench knows Temporal and the worker have worked off their backlog: task
    queue statistics miss the workers' sticky queues, CPU does not.
    """
    t0 = time.monotonic()
    prev, t_prev = cpu_snapshot(roots), t0
    quiet_since: float | None = None
    busy = 0.0
    for _ in range(int(limit_s / interval) + 2):
        await asyncio.sleep(interval)
        now = time.monotonic()
        cur = cpu_snapshot(roots)
        busy = sum(cur.get(n, 0.0) - prev.get(n, 0.0) for n in names) / (now - t_prev)
        prev, t_prev = cur, now
        ok = busy < idle_cores and (extra is None or await extra())
        if not ok:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        if quiet_since is not None and now - quiet_since >= hold_s:
            return {"quiet": True, "busy_until_s": round(quiet_since - t0, 2)}
        if now - t0 > limit_s:
            break
    return {"quiet": False, "busy_until_s": None, "waited_s": round(time.monotonic() - t0, 2),
            "last_cores_busy": round(busy, 2)}  # fmt: skip


async def idle_cores(roots: dict[str, int], names: list[str], seconds: float = 2.0) -> float:
    """CPU the named processes use when nothing is asked of them (the quiet baseline)."""
    c0, t0 = cpu_snapshot(roots), time.monotonic()
    await asyncio.sleep(seconds)
    c1, t1 = cpu_snapshot(roots), time.monotonic()
    return sum(c1.get(n, 0.0) - c0.get(n, 0.0) for n in names) / (t1 - t0)


def code_fingerprint() -> dict[str, Any]:
    """Which app code was measured: others edit it while benches run, often uncommitted."""
    files = [ROOT / "worker.py"]
    for folder in ("api", "activities", "core", "models", "store", "workflows", "migrations"):
        files += sorted((ROOT / folder).rglob("*.py"))
    digest = hashlib.sha256()
    newest = 0.0
    for f in files:
        with contextlib.suppress(OSError):
            digest.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
            newest = max(newest, f.stat().st_mtime)
    return {
        "git_head": _git_commit(),
        "sha256_app_py": digest.hexdigest()[:16],
        "files": len(files),
        "newest_mtime_utc": datetime.fromtimestamp(newest, UTC).isoformat() if newest else None,
    }
