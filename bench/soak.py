"""`python -m bench.soak --minutes 30 --rate 250`: steady traffic for a long time; does the
memory of the API and the worker stay flat, and does every event and message get through?

The traffic and the journeys are those of `bench/chaos.py` (an identify-entered journey that
sends email after 2 s, an order journey that sends an SMS and a webhook), without faults, on a
throwaway stack with the real local sinks. RSS of the API and worker processes is sampled
every `--sample-every` seconds (psutil, else /proc/<pid>/status). Pass: RSS growth under
`--max-growth` (10 %) after the warm-up, and no error: no non-2xx answer, nothing unrouted at
the end, every expected message delivered and recorded `sent`. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.chaos import (
    ORDER,
    RESULTS,
    WELCOME,
    ChaosMix,
    ChaosStack,
    Params,
    Run,
    Sinks,
    count_everything,
    log,
    post_events,
    prepare,
    wait_done,
    write_results,
)
from store.db import create_pool

# README: end-to-end routing about 510 events/s measured with `make bench`; half of it.
DEFAULT_RATE = 250.0


def rss_kib(pid: int) -> int | None:
    """Resident set size of one process in KiB (None when it is gone)."""
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss // 1024)
    except ImportError:
        pass
    except Exception:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class SoakParams:
    minutes: float = 30.0
    rate: float = DEFAULT_RATE
    warmup_minutes: float | None = None  # None: 5, or a third of a run shorter than 15 min
    sample_every: float = 10.0
    max_growth: float = 0.10
    # Each journey event here costs a workflow start, a timer and one or two sends (the
    # `make bench` journeys only wait): shares that keep the default rate sustainable.
    new_users: float = 0.02
    orders: float = 0.02
    batch_size: int = 50
    clients: int = 4
    drain_timeout: float | None = None  # None: as long as the run, at least 300 s
    seed: int = 1

    @property
    def warmup_s(self) -> float:
        if self.warmup_minutes is not None:
            return self.warmup_minutes * 60
        return 300.0 if self.minutes >= 15 else self.minutes * 60 / 3


@dataclass
class Sampler:
    pids: dict[str, int]
    t0: float
    samples: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, every: float, until: float, extra: Any) -> None:
        """A sample now and every `every` s until `until` (monotonic), bounded by it."""
        while True:
            row: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 1)}
            for name, pid in self.pids.items():
                row[f"{name}_rss_kib"] = rss_kib(pid)
            row.update(await extra())
            self.samples.append(row)
            if time.monotonic() + every > until:
                return
            await asyncio.sleep(every)


def growth(samples: list[dict[str, Any]], key: str, warmup_s: float, window_s: float) -> dict:
    """RSS growth of `key`: median of the first `window_s` after the warm-up vs the median of
    the last `window_s` (medians, so one GC pause or burst does not decide)."""
    after = [(s["t"], s[key]) for s in samples if s["t"] >= warmup_s and s.get(key)]
    if len(after) < 2:
        return {"ok": False, "note": "too few samples after the warm-up"}
    start_t, end_t = after[0][0], after[-1][0]
    first = [v for t, v in after if t <= start_t + window_s]
    last = [v for t, v in after if t >= end_t - window_s]
    base, final = statistics.median(first), statistics.median(last)
    return {
        "baseline_kib": int(base),
        "final_kib": int(final),
        "max_kib": max(v for _, v in after),
        "growth": round((final - base) / base, 4),
        "window_s": window_s,
    }


async def soak(run: Run, sp: SoakParams, res: dict[str, Any]) -> None:
    stack = run.stack
    await prepare(stack, [WELCOME, ORDER])
    pool = await create_pool(stack.db_url, min_size=0, max_size=4)
    try:
        pids = {name: pid for name, pid in stack.pids().items() if name in ("api", "worker")}
        res["pids"] = pids
        total = int(sp.rate * sp.minutes * 60)
        mix = ChaosMix(sp.seed, f"s{os.getpid()}", new_users=sp.new_users, orders=sp.orders)
        run.t0 = time.monotonic()
        sampler = Sampler({**pids, "temporal": stack.procs["temporal"].pid}, run.t0)
        window = sp.minutes * 60

        async def backlog() -> dict[str, Any]:
            row: dict[str, Any] = {"accepted": run.ledger.accepted}
            with contextlib.suppress(Exception):
                r = await pool.fetchrow(
                    "SELECT (SELECT count(*) FROM events WHERE routed_at IS NULL) AS unrouted, "
                    "(SELECT count(*) FROM messages WHERE status = 'sent') AS sent, "
                    "(SELECT count(*) FROM messages WHERE status IN ('pending', 'sending')) "
                    "AS open_sends"
                )
                row.update(dict(r or {}))
            return row

        log(f"soak: {total} events at {sp.rate:.0f}/s for {sp.minutes:g} min; warm-up "
            f"{sp.warmup_s:.0f} s; RSS every {sp.sample_every:g} s")  # fmt: skip
        sampling = asyncio.create_task(sampler.run(sp.sample_every, run.t0 + window + 1, backlog))
        try:
            res["posting_s"] = round(
                await post_events(stack.api_url, mix, run.ledger, total=total, rate=sp.rate,
                                  batch_size=sp.batch_size, clients=sp.clients,
                                  budget_s=30.0),
                1,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sampling, sp.sample_every + 30)
        finally:
            sampling.cancel()
            with contextlib.suppress(BaseException):
                await sampling
        res["samples"] = sampler.samples
        log(f"posted {run.ledger.accepted} in {res['posting_s']} s; draining "
            f"(max {sp.drain_timeout or max(300.0, sp.minutes * 60):.0f} s)")  # fmt: skip
        t = time.monotonic()
        drain = sp.drain_timeout or max(300.0, sp.minutes * 60)
        final = await wait_done(run, pool, drain, by_id=False)
        res["drain_s"] = round(time.monotonic() - t, 1)
        res["final"] = final
        res["counts"] = await count_everything(run, pool)
    finally:
        await pool.close()


def verdict(run: Run, sp: SoakParams, res: dict[str, Any]) -> list[dict[str, Any]]:
    led = run.ledger
    window = max(3 * sp.sample_every, min(60.0, (sp.minutes * 60 - sp.warmup_s) / 4))
    rows: list[dict[str, Any]] = []
    for name in ("api", "worker"):
        g = growth(res.get("samples", []), f"{name}_rss_kib", sp.warmup_s, window)
        res.setdefault("rss", {})[name] = g
        ok = "growth" in g and g["growth"] < sp.max_growth
        got = (f"{g['baseline_kib'] // 1024} -> {g['final_kib'] // 1024} MiB "
               f"({g['growth']:+.1%})") if "growth" in g else g.get("note")  # fmt: skip
        rows.append({"check": f"{name} RSS after warm-up", "got": got,
                     "expected": f"< +{sp.max_growth:.0%}", "ok": ok})  # fmt: skip
    non_2xx = sum(n for code, n in led.statuses.items() if code != "200")
    final = res.get("final", {})
    msgs = res.get("counts", {}).get("db", {}).get("messages", {})
    not_sent = sum(n for k, n in msgs.items() if not k.endswith(":sent"))
    missing = sum(final.get(k, 1) for k in ("emails_missing", "sms_missing", "webhooks_missing"))
    unrouted = (final.get("stored") or 0) - (final.get("routed") or 0)
    target = int(sp.rate * sp.minutes * 60)
    rows += [
        {"check": "events accepted", "got": led.accepted, "expected": target,
         "ok": led.accepted == target},
        {"check": "non-2xx answers", "got": non_2xx, "expected": 0, "ok": non_2xx == 0},
        {"check": "unrouted at the end", "got": unrouted, "expected": 0,
         "ok": bool(final.get("done")) or unrouted == 0},
        {"check": "failed / unsent messages", "got": not_sent, "expected": 0,
         "ok": not_sent == 0},
        {"check": "expected messages missing at the sinks", "got": missing, "expected": 0,
         "ok": missing == 0},
        {"check": "posting kept the rate (s)", "got": res.get("posting_s"),
         "expected": f"~{sp.minutes * 60:.0f}", "ok": None},
        {"check": "drain after posting (s)", "got": res.get("drain_s"), "expected": None,
         "ok": None},
    ]  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench.chaos import format_table

    d = SoakParams()
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=d.minutes)
    p.add_argument("--rate", type=float, default=d.rate, help="events/s (default: half of "
                   "the ~510/s end-to-end rate measured by `make bench`)")  # fmt: skip
    p.add_argument("--warmup-minutes", type=float, default=None,
                   help="default 5, or a third of runs shorter than 15 minutes")  # fmt: skip
    p.add_argument("--sample-every", type=float, default=d.sample_every, help="s between RSS")
    p.add_argument("--max-growth", type=float, default=d.max_growth)
    p.add_argument(
        "--new-users",
        type=float,
        default=d.new_users,
        help="share of events that are a new customer's identify (welcome email)",
    )
    p.add_argument(
        "--orders",
        type=float,
        default=d.orders,
        help="share of the other events that are an order (SMS + webhook)",
    )
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    sp = SoakParams(minutes=a.minutes, rate=a.rate, warmup_minutes=a.warmup_minutes,
                    sample_every=a.sample_every, max_growth=a.max_growth,
                    new_users=a.new_users, orders=a.orders, drain_timeout=a.drain_timeout,
                    seed=a.seed)  # fmt: skip
    started = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    stamp = started.replace(":", "").replace("-", "")
    command = " ".join(["python -m bench.soak", *sys.argv[1:]])
    res: dict[str, Any] = {"started_at": started, "params": asdict(sp), "command": command}
    signal.signal(signal.SIGTERM, _raise_interrupt)
    sinks = Sinks()
    stack = ChaosStack(keep_logs=a.out / f"soak-logs-{stamp}" if a.keep_logs else None)
    run = Run(Params(worker_kills=0, temporal_restarts=0, postgres_restarts=0), stack, sinks)
    t0 = time.monotonic()
    code = 0
    try:
        sinks.start()
        stack.extra_env = sinks.env()
        log(f"stack in {stack.tmp}")
        stack.start_servers()
        asyncio.run(soak(run, sp, res))
    except KeyboardInterrupt:
        res["error"] = "interrupted"
        code = 130
    except Exception as err:
        res["error"] = "".join(traceback.format_exception(err))
    finally:
        res["logs"] = stack.log_problems() if stack.logs.exists() else {}
        stack.stop()
        sinks.stop()
    res["wall_s"] = round(time.monotonic() - t0, 1)
    res["ledger"] = {"accepted": run.ledger.accepted, "statuses": dict(run.ledger.statuses),
                     "gave_up_events": run.ledger.gave_up_events,
                     "expected": {"emails": len(run.ledger.expected_emails),
                                  "orders": len(run.ledger.expected_orders)}}  # fmt: skip
    res["checks"] = verdict(run, sp, res)
    res["passed"] = "error" not in res and all(c["ok"] is not False for c in res["checks"])
    path = write_results(res, a.out, "soak")
    print()
    print(format_table(res["checks"]))
    if "error" in res:
        print(f"run did not complete: {res['error'].strip().splitlines()[-1]}")
    print(f"results: {path}")
    print("PASSED" if res["passed"] else "FAILED")
    return code or (0 if res["passed"] else 1)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
