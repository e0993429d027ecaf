"""Load against the app: the event mix, (a) sustained ingestion, (b) event-to-message latency."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx

from bench.stack import WRITE_KEY
from bench.stats import summary
from core.settings import asyncpg_dsn

CART_ID = "bench_cart"
WELCOME_ID = "bench_welcome"

CART = {
    "id": CART_ID,
    "name": "Bench cart",
    "entry": {"type": "track", "event": "Product Added"},
    "exit_on": [{"event": "Order Completed"}],
    "re_entry": {"policy": "always"},
    "steps": [
        {"id": "wait_1h", "kind": "wait", "duration": "1h"},
        {
            "id": "reminder",
            "kind": "send",
            "channel": "outbox",
            "template": {
                "subject": "{{ event.properties.name | default('Your item') }} is in your cart",
                "body": "Hi {{ profile.first_name | default('there') }}, complete your order.",
            },
        },
    ],
}

WELCOME = {
    "id": WELCOME_ID,
    "name": "Bench welcome",
    "entry": {"type": "track", "event": "Signed Up"},
    "re_entry": {"policy": "never"},
    "steps": [
        {
            "id": "welcome",
            "kind": "send",
            "channel": "outbox",
            "template": {
                "subject": "Welcome, {{ profile.first_name | default('friend') }}!",
                "body": "Thanks for joining us, {{ profile.first_name | default('friend') }}.",
            },
        },
        {"id": "wait_1h", "kind": "wait", "duration": "1h"},
    ],
}

# (share, kind, event name). A quarter of the events reach a journey.
MIX: list[tuple[float, str, str | None]] = [
    (0.12, "track", "Product Added"),
    (0.08, "track", "Order Completed"),
    (0.05, "track", "Signed Up"),
    (0.40, "page", None),
    (0.35, "track", "*other*"),
]
JOURNEY_EVENTS = ("Product Added", "Order Completed", "Signed Up")
OTHER_TRACKS = ("Product Viewed", "Products Searched", "Cart Viewed", "Video Played", "Clicked")
PAGES = ("Home", "Pricing", "Docs", "Blog", "Product", "Checkout")
PRODUCTS = ("Blue Mug", "Red Kettle", "Tea Sampler", "Notebook", "Desk Lamp")

NOTIFY_SENT = "bench_message_sent"
MAX_MISSES = 5  # consecutive latency samples without a message: stop the phase
# Bench-only trigger in the throwaway database (no app change): tells the bench the moment a
# message is marked sent, naming the customer's userId (each latency sample uses a fresh one),
# so the bench never polls the messages table and does not depend on the idempotency key format.
SENT_TRIGGER = f"""
CREATE OR REPLACE FUNCTION bench_message_sent() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE uid text;
BEGIN
  IF NEW.sent_at IS NULL THEN
    RETURN NULL;
  END IF;
  IF TG_OP = 'UPDATE' THEN
    IF OLD.sent_at IS NOT NULL THEN
      RETURN NULL;
    END IF;
  END IF;
  SELECT value INTO uid FROM identities
    WHERE customer_id = NEW.customer_id AND kind = 'user' LIMIT 1;
  PERFORM pg_notify('{NOTIFY_SENT}',
                    coalesce(uid, '') || ' ' || extract(epoch FROM NEW.sent_at)::text);
  RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS bench_message_sent ON messages;
CREATE TRIGGER bench_message_sent AFTER INSERT OR UPDATE OF sent_at ON messages
  FOR EACH ROW EXECUTE FUNCTION bench_message_sent();
"""


class EventMix:
    """Segment events over a fixed set of userIds, reproducible from the seed."""

    def __init__(self, users: int, seed: int, tag: str) -> None:
        self.rng = random.Random(seed)
        self.users = [f"user-{i:05d}" for i in range(users)]
        self.tag = tag
        self.n = 0
        self.weights = [w for w, _, _ in MIX]

    def next(self) -> dict[str, Any]:
        rng = self.rng
        self.n += 1
        _, kind, name = rng.choices(MIX, weights=self.weights)[0]
        e: dict[str, Any] = {
            "type": kind,
            "userId": rng.choice(self.users),
            "messageId": f"{self.tag}-{self.n}",
            "timestamp": datetime.now(UTC).isoformat(),
            "context": {"library": {"name": "bench", "version": "1"}, "ip": "127.0.0.1"},
        }
        if kind == "page":
            page = rng.choice(PAGES)
            e["name"] = page
            e["properties"] = {"path": f"/{page.lower()}", "referrer": "https://example.com/"}
            return e
        if name == "*other*":
            name = rng.choice(OTHER_TRACKS)
        e["event"] = name
        if name in ("Product Added", "Product Viewed"):
            e["properties"] = {"name": rng.choice(PRODUCTS), "price": rng.randint(5, 90)}
        elif name == "Order Completed":
            e["properties"] = {"order_id": uuid.uuid4().hex[:12], "total": rng.randint(10, 300)}
        elif name == "Signed Up":
            e["properties"] = {"plan": rng.choice(("free", "pro"))}
        else:
            e["properties"] = {"query": "mug"}
        return e

    def batch(self, size: int) -> list[dict[str, Any]]:
        return [self.next() for _ in range(size)]


def _client(api_url: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=api_url,
        auth=(WRITE_KEY, ""),
        headers={"content-type": "application/json"},
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=30.0,
    )


async def unrouted(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM events WHERE routed_at IS NULL"))


async def wait_drained(pool: asyncpg.Pool, limit_s: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await unrouted(pool) == 0:
            return True
        await asyncio.sleep(interval)
    return await unrouted(pool) == 0


async def skip_unrouted(pool: asyncpg.Pool) -> int:
    """Mark what the router did not get to as routed, so later phases start from a clean state.

    Only used when the drain wait ran out; the count is reported as `skipped_unrouted`.
    """
    status = await pool.execute("UPDATE events SET routed_at = now() WHERE routed_at IS NULL")
    return int(status.split()[-1])


# -- (a) ingestion -------------------------------------------------------------------------
async def run_ingestion(
    api_url: str,
    pool: asyncpg.Pool,
    mix: EventMix,
    *,
    duration: float,
    clients: int,
    batch_size: int,
    drain_timeout: float,
    on_window_end: Callable[[], None] | None = None,
) -> dict[str, Any]:
    accepted = 0
    requests = 0
    statuses: dict[str, int] = {}
    request_ms: list[float] = []
    backlog: list[dict[str, float]] = []
    first_id = int(await pool.fetchval("SELECT coalesce(max(id), 0) FROM events"))
    t_start = time.monotonic()
    deadline = t_start + duration
    max_requests = int(duration * 2000)  # a bound far above what one API process can serve

    async def poster(http: httpx.AsyncClient) -> None:
        nonlocal accepted, requests, max_requests
        while time.monotonic() < deadline and max_requests > 0:
            max_requests -= 1
            events = mix.batch(batch_size)
            body = json.dumps({"batch": events}).encode()
            t0 = time.monotonic()
            try:
                r = await http.post("/v1/batch", content=body)
                code = str(r.status_code)
            except httpx.HTTPError as err:
                code = type(err).__name__
            request_ms.append((time.monotonic() - t0) * 1000)
            requests += 1
            statuses[code] = statuses.get(code, 0) + 1
            if code == "200":
                accepted += len(events)
            else:
                await asyncio.sleep(0.05)

    async def monitor() -> None:
        # Backlog once a second while posting (bounded by the window).
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                row = await pool.fetchrow(
                    "SELECT (SELECT count(*) FROM events WHERE routed_at IS NULL) AS unrouted, "
                    "(SELECT coalesce(max(id), 0) FROM events) AS last_id"
                )
                assert row is not None
                backlog.append(
                    {
                        "t": round(time.monotonic() - t_start, 2),
                        "stored": int(row["last_id"]) - first_id,
                        "unrouted": int(row["unrouted"]),
                    }
                )

    async with _client(api_url, clients) as http:
        await http.get("/health")
        mon = asyncio.create_task(monitor())
        await asyncio.gather(*(poster(http) for _ in range(clients)))
        t_end = time.monotonic()
        mon.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await mon
    window = t_end - t_start
    if on_window_end is not None:
        on_window_end()
    left_at_end = await unrouted(pool)
    drained = await wait_drained(pool, drain_timeout)
    t_drained = time.monotonic()
    left = await unrouted(pool)
    routed_total = accepted - left if not drained else accepted
    e2e = t_drained - t_start
    return {
        "window_s": round(window, 3),
        "clients": clients,
        "batch_size": batch_size,
        "requests": requests,
        "statuses": statuses,
        "accepted_events": accepted,
        "accepted_per_s": round(accepted / window, 1) if window else None,
        "request_ms": summary(request_ms),
        "unrouted_at_window_end": left_at_end,
        "drained": drained,
        "unrouted_after_drain_wait": left,
        "drain_after_window_s": round(t_drained - t_end, 3),
        "end_to_end_s": round(e2e, 3),
        "end_to_end_per_s": round(accepted / e2e, 1) if drained else None,
        "routed_per_s_lower_bound": round(routed_total / e2e, 1),
        "backlog_timeline": backlog,
        "first_event_id": first_id,
        "_t_start": t_start,
        "_t_start_epoch": time.time() - (time.monotonic() - t_start),
    }


async def routing_analysis(pool: asyncpg.Pool, first_id: int, since: float) -> dict[str, Any]:
    """What the router did, read back from the tables (no app instrumentation needed).

    Each router round marks its chunk with one `routed_at` (= now() of its second
    transaction), so grouping by it gives the chunks, their sizes and the time between them.
    """
    chunks = await pool.fetch(
        "SELECT extract(epoch FROM routed_at)::float8 AS t, count(*) AS n FROM events "
        "WHERE id > $1 AND routed_at IS NOT NULL GROUP BY routed_at ORDER BY routed_at",
        first_id,
    )
    sizes = [int(r["n"]) for r in chunks]
    times = [float(r["t"]) for r in chunks]
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(times)]
    lag = await pool.fetchrow(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY l) AS p50, "
        "percentile_cont(0.99) WITHIN GROUP (ORDER BY l) AS p99, max(l) AS max FROM ("
        "  SELECT extract(epoch FROM routed_at - received_at) * 1000 AS l FROM events "
        "  WHERE id > $1 AND routed_at IS NOT NULL) x",
        first_id,
    )
    # The Temporal calls the router made, from the events: one per (chunk, customer, journey)
    # with a journey event in it: a signal-with-start for an entry, else a signal. A welcome
    # run reacts to nothing after its entry, and a cart run only to `Order Completed`; a
    # signal carrying nothing else changes nothing in the run (a no-op workflow task).
    calls = await pool.fetch(
        "SELECT j, has_exit, count(*) AS n FROM ("
        "  SELECT routed_at, customer_id, "
        "    CASE WHEN event = 'Signed Up' THEN $3 ELSE $4 END AS j, "
        "    bool_or(event = 'Order Completed') AS has_exit "
        "  FROM events WHERE id > $1 AND event = ANY($2::text[]) AND routed_at IS NOT NULL "
        "  GROUP BY 1, 2, 3) x GROUP BY 1, 2",
        first_id,
        list(JOURNEY_EVENTS),
        WELCOME_ID,
        CART_ID,
    )
    starts = {
        r["journey_id"]: int(r["n"])
        for r in await pool.fetch(
            "SELECT journey_id, count(*) AS n FROM journey_runs "
            "WHERE started_at >= to_timestamp($1) GROUP BY 1",
            since,
        )
    }
    per: dict[str, dict[str, int]] = {}
    for r in calls:
        d = per.setdefault(r["j"], {"calls_with_exit_event": 0, "calls_entry_event_only": 0})
        d["calls_with_exit_event" if r["has_exit"] else "calls_entry_event_only"] += int(r["n"])
    for jid, d in per.items():
        d["runs_started"] = starts.get(jid, 0)
        d["noop_signals_approx"] = max(0, d["calls_entry_event_only"] - d["runs_started"])
    total_calls = sum(int(r["n"]) for r in calls)
    runs = await pool.fetch(
        "SELECT journey_id, status, count(*) AS n FROM journey_runs GROUP BY 1, 2 ORDER BY 1, 2"
    )
    messages = await pool.fetchval("SELECT count(*) FROM messages")
    customers = await pool.fetchval("SELECT count(*) FROM customers")
    return {
        "chunks": len(sizes),
        "chunk_size": summary([float(s) for s in sizes], 1),
        "ms_between_chunks": summary(gaps, 1),
        "route_lag_ms": {k: round(float(v), 1) for k, v in dict(lag or {}).items() if v},
        "temporal_calls_upper_bound": total_calls,
        "temporal_calls_by_journey": per,
        "journey_runs": {f"{r['journey_id']}:{r['status']}": int(r["n"]) for r in runs},
        "messages": int(messages or 0),
        "customers": int(customers or 0),
    }


# -- (b) latency ---------------------------------------------------------------------------
class SentListener:
    """LISTEN for the bench trigger; resolves a future per entry messageId."""

    def __init__(self) -> None:
        self.conn: asyncpg.Connection | None = None
        self.waiters: dict[str, asyncio.Future[float]] = {}

    async def start(self, db_url: str) -> None:
        self.conn = await asyncpg.connect(asyncpg_dsn(db_url))
        await self.conn.add_listener(NOTIFY_SENT, self._on_notify)

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        user_id, _, epoch = payload.rpartition(" ")
        fut = self.waiters.pop(user_id, None)
        if fut is not None and not fut.done():
            fut.set_result(float(epoch))


async def install_sent_trigger(pool: asyncpg.Pool) -> None:
    await pool.execute(SENT_TRIGGER)


async def run_latency(
    api_url: str,
    pool: asyncpg.Pool,
    listener: SentListener,
    *,
    tag: str,
    samples: int,
    gap: float,
    limit_s: float,
    budget_s: float = 600.0,
) -> list[dict[str, Any]]:
    """`Signed Up` for a fresh user, one at a time: client clock before POST -> sent_at."""
    out: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    async with _client(api_url, 1) as http:
        await http.get("/health")  # open the keep-alive connection before timing
        t_begin = time.monotonic()
        misses = 0
        for i in range(samples):
            if time.monotonic() - t_begin > budget_s or misses >= MAX_MISSES:
                break  # the phase's time budget is spent, or the pipeline is stuck
            mid = f"lat-{tag}-{i}-{uuid.uuid4().hex[:8]}"
            user_id = f"lat-{tag}-{i}"
            body = json.dumps(
                {
                    "userId": user_id,
                    "event": "Signed Up",
                    "messageId": mid,
                    "properties": {"plan": "free"},
                    "timestamp": datetime.now(UTC).isoformat(),
                }
            ).encode()
            fut: asyncio.Future[float] = loop.create_future()
            listener.waiters[user_id] = fut
            t0 = time.time()
            r = await http.post("/v1/track", content=body)
            t_http = time.time()
            sample: dict[str, Any] = {"i": i, "message_id": mid, "user_id": user_id, "t0": t0}
            sample["status"] = r.status_code
            sample["http_ms"] = (t_http - t0) * 1000
            try:
                sent = await asyncio.wait_for(fut, limit_s)
            except TimeoutError:
                listener.waiters.pop(user_id, None)
                sent = await pool.fetchval(  # a lost notification: look it up once
                    "SELECT min(extract(epoch FROM m.sent_at))::float8 FROM messages m "
                    "JOIN identities i ON i.customer_id = m.customer_id AND i.kind = 'user' "
                    "WHERE i.value = $1",
                    user_id,
                )
            if sent is None:
                sample["timeout"] = True
                misses += 1
            else:
                misses = 0
                sample["sent_at"] = float(sent)
                sample["latency_ms"] = (float(sent) - t0) * 1000
            out.append(sample)
            if gap:
                await asyncio.sleep(gap)
    return out


async def latency_db_marks(pool: asyncpg.Pool, samples: list[dict[str, Any]]) -> None:
    """Add the database timestamps of each sample's way through the app (in place)."""
    rows = await pool.fetch(
        "SELECT e.message_id, extract(epoch FROM e.received_at)::float8 AS received, "
        "extract(epoch FROM e.routed_at)::float8 AS routed, "
        "extract(epoch FROM r.started_at)::float8 AS run_row, r.workflow_id, r.run_id, "
        "extract(epoch FROM m.created_at)::float8 AS msg_created "
        "FROM events e "
        "LEFT JOIN LATERAL (SELECT * FROM journey_runs r WHERE r.customer_id = e.customer_id "
        "  AND r.journey_id = $2 ORDER BY r.started_at LIMIT 1) r ON true "
        "LEFT JOIN LATERAL (SELECT * FROM messages m WHERE m.customer_id = e.customer_id "
        "  AND m.journey_id = $2 ORDER BY m.id LIMIT 1) m ON true "
        "WHERE e.message_id = ANY($1::text[])",
        [s["message_id"] for s in samples],
        WELCOME_ID,
    )
    by_mid = {r["message_id"]: dict(r) for r in rows}
    for s in samples:
        row = by_mid.get(s["message_id"])
        if row:
            s.update({k: v for k, v in row.items() if k != "message_id"})
