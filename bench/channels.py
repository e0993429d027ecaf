"""`python -m bench.channels`: sends/s through the real SMTP and HTTP providers, and the cost
of the contact-policy check per send. Target: policy check p99 under 5 ms.

A throwaway embedded PostgreSQL (migrated), a local aiosmtpd server and the local deduplicating
HTTP provider (activities.channels.sandbox), all on this machine. Phases:
  policy   `ContactPolicy.decide` (lock + consent + suppression + three caps counted in
           Postgres) for customers who already have messages in the cap windows; one
           decision per transaction, as at send time.
  sends    `send_message` (the activity body, without Temporal): render, reserve under the
           policy, claim, provider call, record; N sends at a concurrency, per channel.
  raw      the channel's `deliver` alone, same N and concurrency: the provider's own cost.
Writes bench/results/channels-<UTC>.json and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from activities.channels import Channel, RenderedMessage, build_channels
from activities.channels.sandbox import MailSink, provider_settings, serve, serve_smtp
from activities.contact_policy import Cap, ContactPolicy
from activities.journey_activities import JourneyActivities
from bench.stats import machine_info, summary
from core.embedded import find_binary, start_postgres
from core.logs import configure_logging
from core.settings import Settings
from models.runtime import SendRequest
from store.db import create_pool, migrate

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_POLICY_P99_MS = 5.0


async def _customers(pool: Any, n: int, history: int) -> list[str]:
    ids = [f"bench-{i}" for i in range(n)]
    await pool.executemany(
        "INSERT INTO customers (id, traits) VALUES ($1, $2)",
        [(c, {"email": f"{c}@example.com", "phone": f"+1555{i:07d}", "name": c})
         for i, c in enumerate(ids)],
    )  # fmt: skip
    await pool.executemany(
        "INSERT INTO messages (idempotency_key, customer_id, journey_id, channel, body, status, "
        "created_at) VALUES ($1, $2, 'old', 'email', 'x', 'sent', now() - interval '1 day')",
        [(f"old-{c}-{k}", c) for c in ids for k in range(history)],
    )
    return ids


async def bench_policy(pool: Any, customers: list[str], rounds: int) -> dict[str, Any]:
    policy = ContactPolicy([Cap(3, timedelta(days=7)), Cap(2, timedelta(days=1), channel="sms")])
    times: list[float] = []
    for i in range(rounds):
        cid = customers[i % len(customers)]
        traits = {"email": f"{cid}@example.com", "phone": "+15550000000"}
        async with pool.acquire() as conn, conn.transaction():
            t0 = time.perf_counter()
            await policy.lock(conn, cid)
            await policy.decide(conn, customer_id=cid, traits=traits, channel="sms",
                                category="marketing", topic="marketing", journey_id="j",
                                journey_cap="5/30d")  # fmt: skip
            times.append((time.perf_counter() - t0) * 1000)
    return {"decisions": rounds, "ms": summary(times, 3)}


async def _timed(n: int, concurrency: int, one: Any) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def run(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            await one(i)
            lat.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(n)))
    wall = time.perf_counter() - t0
    return {"n": n, "seconds": round(wall, 3), "per_s": round(n / wall, 1), "ms": summary(lat)}


async def bench_sends(
    pool: Any, channels: dict[str, Channel], customers: list[str], name: str, n: int, conc: int
) -> dict[str, Any]:
    acts = JourneyActivities(pool, channels=channels, policy=ContactPolicy([]))
    run = uuid.uuid4().hex[:6]

    async def send(i: int) -> None:
        req = SendRequest(
            idempotency_key=f"{run}:{name}:{i}", category="transactional",
            customer_id=customers[i % len(customers)], journey_id="bench", journey_version=1,
            step_id="s", workflow_id=f"wf-{i}", channel=name, subject="Hi {{ profile.name }}",
            body="Hello {{ profile.name }}, your order shipped.",
        )  # fmt: skip
        result = await acts.send_message(req)
        if result.status != "sent":
            raise RuntimeError(f"send {i}: {result}")

    async def deliver(i: int) -> None:
        cid = customers[i % len(customers)]
        to = f"{cid}@example.com" if name == "email" else "+15550000000"
        await channels[name].deliver(
            RenderedMessage(f"{run}:raw:{name}:{i}", cid, name, "Hi", "Hello", to=to)
        )

    return {
        "sends": await _timed(n, conc, send),
        "raw_deliver": await _timed(n, conc, deliver),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-channels-"))
    server, url = start_postgres(tmp / "pg")
    recorder = MailSink()
    smtp = serve_smtp(recorder)
    provider, http_server = serve()
    try:
        await migrate(url)
        pool = await create_pool(url, max_size=args.concurrency + 4)
        settings = Settings(
            smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_timeout=10,
            **provider_settings(provider),
        )  # fmt: skip
        channels = build_channels(settings)
        customers = await _customers(pool, args.customers, history=2)
        out: dict[str, Any] = {"policy": await bench_policy(pool, customers, args.decisions)}
        for name in ("email", "sms"):
            out[name] = await bench_sends(
                pool, channels, customers, name, args.sends, args.concurrency
            )
        out["received"] = {"smtp": len(recorder.envelopes), "http": len(provider.deliveries)}
        await pool.close()
        return out
    finally:
        http_server.shutdown()
        smtp.stop()
        server.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.channels", description=__doc__.split("\n")[0])
    p.add_argument("--decisions", type=int, default=3000, help="policy decisions timed")
    p.add_argument("--sends", type=int, default=1000, help="sends per channel")
    p.add_argument("--concurrency", type=int, default=32, help="sends in flight")
    p.add_argument("--customers", type=int, default=500)
    args = p.parse_args(argv)
    configure_logging("console", "WARNING")
    started = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    res = {
        "schema": 1,
        "started_at": started,
        "command": " ".join(["python -m bench.channels", *sys.argv[1:]]),
        "params": vars(args),
        "targets": {"policy_check_p99_ms": TARGET_POLICY_P99_MS},
        "machine": machine_info(find_binary("temporal")),
        **asyncio.run(main_async(args)),
    }
    p99 = res["policy"]["ms"]["p99"]
    res["met"] = {"policy_check_p99_ms": p99 < TARGET_POLICY_P99_MS}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"channels-{started.replace(':', '').replace('-', '')}.json"
    path.write_text(json.dumps(res, indent=2, default=str))
    verdict = "met" if res["met"]["policy_check_p99_ms"] else "NOT met"
    print(f"policy check: p50 {res['policy']['ms']['p50']} ms, p99 {p99} ms "
          f"(target < {TARGET_POLICY_P99_MS} ms: {verdict})")  # fmt: skip
    for name in ("email", "sms"):
        s, r = res[name]["sends"], res[name]["raw_deliver"]
        print(f"{name}: {s['per_s']} sends/s end to end (p99 {s['ms']['p99']} ms); "
              f"provider alone {r['per_s']}/s")  # fmt: skip
    print(f"received: {res['received']}; results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
