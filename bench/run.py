"""`python -m bench.run`: ingestion throughput and event-to-message latency, ours vs raw Temporal.

One run, one throwaway stack (embedded PostgreSQL, Temporal dev server, `python worker.py`, one
uvicorn API process). Phases: (a) sustained `/v1/batch` ingestion until the router has routed
everything; (b) `Signed Up` -> welcome message latency; (c1)/(c2) the same two operations as
bare signal-with-start calls on a minimal workflow (bench/raw.py). Prints a table and writes
bench/results/bench-<UTC>.json and bench/results/latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import traceback
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import load, raw
from bench.marks import OURS_STAGES, RAW_STAGES, add_history_marks, stages
from bench.stack import Stack
from bench.stats import CpuMeter, code_fingerprint, idle_cores, machine_info, quiesce, summary
from core.embedded import find_binary
from core.temporal import connect
from store.db import create_pool, migrate
from store.journeys import parse_definition, publish

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_EVENTS_PER_S = 1000.0
TARGET_LATENCY_FACTOR = 2.0


async def _no_backlog(pool: Any) -> bool:
    return await load.unrouted(pool) == 0


def log(msg: str) -> None:
    print(f"[bench {datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=20.0, help="ingestion seconds (a, c1)")
    p.add_argument("--samples", type=int, default=300, help="latency samples (b, c2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 s, 50 samples")
    p.add_argument("--clients", type=int, default=8, help="concurrent /v1/batch posters")
    p.add_argument("--batch-size", type=int, default=100, help="events per /v1/batch")
    p.add_argument("--users", type=int, default=3000, help="distinct userIds in the mix")
    p.add_argument("--raw-concurrency", type=int, default=64, help="raw SWS callers (c1)")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="max wait to drain (s)")
    p.add_argument("--settle-timeout", type=float, default=300.0, help="max wait for quiet (s)")
    p.add_argument("--latency-budget", type=float, default=60.0, help="max s per latency phase")
    p.add_argument("--sample-timeout", type=float, default=10.0, help="per latency sample (s)")
    p.add_argument("--gap-ms", type=float, default=10.0, help="pause between latency samples")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep-logs", action="store_true", help="copy process logs to results/")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.samples = 5.0, 50
    return args


def _ok(v: Any) -> bool:
    return isinstance(v, int | float)


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 2) if _ok(a) and _ok(b) and b else None


def build_table(res: dict[str, Any]) -> list[dict[str, Any]]:
    ours_i = res.get("ours", {}).get("ingestion", {})
    raw_i = res.get("raw", {}).get("ingestion", {})
    ours_l = res.get("ours", {}).get("latency", {}).get("summary", {})
    raw_l = res.get("raw", {}).get("latency", {}).get("summary", {})
    want = int(res.get("params", {}).get("samples", 0))
    rows: list[dict[str, Any]] = []
    for metric, key, raw_key, note in (
        ("ingestion accepted (events/s)", "accepted_per_s", "accepted_per_s",
         "ours: HTTP 200s from /v1/batch; raw: signal-with-start calls answered"),
        ("ingestion end-to-end (events/s)", "end_to_end_per_s", "end_to_end_per_s",
         "ours: all events routed (routed_at set); raw: every event's activity has run"),
    ):  # fmt: skip
        ours, base = ours_i.get(key), raw_i.get(raw_key)
        row = {"metric": metric, "ours": ours, "raw": base, "note": note}
        if ours is None and key == "end_to_end_per_s" and ours_i:
            ours = ours_i.get("routed_per_s_lower_bound")
            row["ours"] = ours
            row["note"] = "ours did NOT drain: routed events / (window + drain wait)"
        row.update(
            ratio=_ratio(ours, base),
            target=f">= {TARGET_EVENTS_PER_S:.0f}",
            met=bool(_ok(ours) and ours >= TARGET_EVENTS_PER_S and row["note"][:4] != "ours d"),
        )
        rows.append(row)
    ours = ours_i.get("processed_per_s")
    base = raw_i.get("end_to_end_per_s")
    rows.append(
        {
            "metric": "ingestion fully processed (events/s)",
            "ours": ours,
            "raw": base,
            "ratio": _ratio(ours, base),
            "target": None,
            "met": None,
            "note": "ours: routed and Temporal + worker quiet again (every signal handled)",
        }
    )
    idle_l = res.get("ours", {}).get("latency_idle", {}).get("summary", {})
    for q in ("p50", "p95", "p99", "max"):
        ours, base = idle_l.get(q), raw_l.get(q)
        row = {
            "metric": f"latency {q}, idle stack (ms)",
            "ours": ours,
            "raw": base,
            "ratio": _ratio(ours, base),
            "target": None,
            "met": None,
        }
        if q == "p99":
            row["note"] = "ours (b0): before the ingestion phase, nothing else running"
        rows.append(row)
    for q in ("p50", "p95", "p99", "max"):
        ours, base = ours_l.get(q), raw_l.get(q)
        row = {
            "metric": f"latency {q}, after ingestion (ms)",
            "ours": ours,
            "raw": base,
            "ratio": _ratio(ours, base),
            "target": None,
            "met": None,
        }
        if q == "p99":
            limit = TARGET_LATENCY_FACTOR * base if _ok(base) else None
            row["target"] = f"<= 2x raw p99 = {limit:.1f}" if limit is not None else "<= 2x raw"
            complete = ours_l.get("timeouts", 1) == 0 and ours_l.get("n", 0) >= want
            row["met"] = bool(_ok(ours) and limit is not None and ours <= limit and complete)
            if not complete:
                row["note"] = (
                    f"ours: {ours_l.get('n', 0)} of {want} samples arrived, "
                    f"{ours_l.get('timeouts', 0)} timed out: percentiles are of arrivals only"
                )
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:,.2f}"
        return str(v)

    head = ["metric", "ours", "raw", "ratio ours/raw", "target", "met"]
    body = [
        [r["metric"], cell(r["ours"]), cell(r["raw"]), cell(r["ratio"]), cell(r["target"]),
         cell(r["met"])]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), line]
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(out)


def _lat_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    values = [s["latency_ms"] for s in samples if "latency_ms" in s]
    out = summary(values)
    out["timeouts"] = sum(1 for s in samples if s.get("timeout"))
    return out


def _round_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: round(v, 6) if isinstance(v, float) else v for k, v in s.items()} for s in samples]


async def ours_latency(
    stack: Stack,
    pool: Any,
    listener: load.SentListener,
    client: Any,
    roots: dict[str, int],
    args: argparse.Namespace,
    res: dict[str, Any],
    *,
    tag: str,
    phase: str,
) -> dict[str, Any]:
    meter = CpuMeter(roots).start()
    samples = await load.run_latency(
        stack.api_url,
        pool,
        listener,
        tag=tag,
        samples=args.samples,
        gap=args.gap_ms / 1000,
        limit_s=args.sample_timeout,
        budget_s=args.latency_budget,
    )
    res["cpu"][phase] = meter.stop()
    await load.latency_db_marks(pool, samples)
    await add_history_marks(client, samples)
    lat = _lat_summary(samples)
    log(f"    p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, timeouts {lat['timeouts']}")
    return {
        "summary": lat,
        "http_ms": summary([s["http_ms"] for s in samples]),
        "stages_ms": stages(samples, OURS_STAGES),
        "samples": _round_samples(samples),
    }


async def bench(stack: Stack, args: argparse.Namespace, res: dict[str, Any]) -> None:
    tag = uuid.uuid4().hex[:6]
    log(f"migrating PostgreSQL; publishing {load.CART_ID} and {load.WELCOME_ID}")
    await migrate(stack.db_url)
    pool = await create_pool(stack.db_url, max_size=10)
    listener = load.SentListener()
    client = None
    try:
        async with pool.acquire() as conn:
            res["machine"]["postgres"] = await conn.fetchval("SHOW server_version")
        for defn in (load.CART, load.WELCOME):
            await publish(pool, parse_definition(defn, defn["id"]))
        await load.install_sent_trigger(pool)
        await listener.start(stack.db_url)
        log("starting worker.py and the API (uvicorn, one process)")
        await asyncio.to_thread(stack.start_app)
        client = await connect(stack.temporal_address)
        roots = stack.pids()
        res["processes"] = roots

        log("warm-up: 5 Signed Up through the app")
        warm = await load.run_latency(
            stack.api_url, pool, listener, tag=f"warm{tag}", samples=5, gap=0.05, limit_s=60
        )
        if any(s.get("timeout") for s in warm):
            raise RuntimeError(
                "warm-up message never arrived; worker log:\n" + stack.log_samples("worker", 20)
            )
        res["warmup_ms"] = [round(s["latency_ms"], 1) for s in warm]
        idle = await idle_cores(roots, ["temporal", "worker"])
        res["idle_cores_temporal_worker"] = round(idle, 3)

        # (b0) latency on the idle stack, before any load ------------------------------------
        log(f"(b0) latency on the idle stack: {args.samples} x Signed Up -> welcome message")
        res["ours"]["latency_idle"] = await ours_latency(
            stack, pool, listener, client, roots, args, res, tag=f"idle{tag}", phase="b0_idle"
        )

        # (a) ingestion -------------------------------------------------------------------
        log(f"(a) ingestion: {args.clients} clients x {args.batch_size} events for "
            f"{args.duration:.0f} s, then drain (max {args.drain_timeout:.0f} s)")  # fmt: skip
        mix = load.EventMix(args.users, args.seed, f"b{tag}")
        meters = [CpuMeter(roots).start()]

        def window_ended() -> None:
            res["cpu"]["a1_window"] = meters[0].stop()
            meters[0] = CpuMeter(roots).start()

        ing = await load.run_ingestion(
            stack.api_url,
            pool,
            mix,
            duration=args.duration,
            clients=args.clients,
            batch_size=args.batch_size,
            drain_timeout=args.drain_timeout,
            on_window_end=window_ended,
        )
        res["cpu"]["a2_drain"] = meters[0].stop()
        res["ours"]["ingestion"] = ing
        meter = CpuMeter(roots).start()
        t_start = ing.pop("_t_start")
        since = ing.pop("_t_start_epoch")
        log(f"    accepted {ing['accepted_events']} events, {ing['accepted_per_s']}/s; "
            f"drained={ing['drained']} {ing['drain_after_window_s']} s after the window; "
            f"end-to-end {ing['end_to_end_per_s']}/s")  # fmt: skip
        res["ours"]["routing"] = await load.routing_analysis(pool, ing["first_event_id"], since)
        if not ing["drained"]:
            ing["skipped_unrouted"] = await load.skip_unrouted(pool)
            log(f"    NOT drained: marked {ing['skipped_unrouted']} unrouted events as routed "
                "so that the next phases start clean")  # fmt: skip
        log("    waiting for Temporal and the worker to work off their backlog")
        t_q = time.monotonic()
        quiet = await quiesce(
            roots,
            ["temporal", "worker"],
            limit_s=args.settle_timeout,
            idle_cores=idle + 0.1,
            extra=lambda: _no_backlog(pool),
        )
        res["cpu"]["a3_settle"] = meter.stop()
        if quiet["quiet"]:
            done = t_q + quiet["busy_until_s"] - t_start
            ing["processed_s"] = round(done, 2)
            if ing["drained"]:
                ing["processed_per_s"] = round(ing["accepted_events"] / done, 1)
        ing["settle"] = quiet
        # Enrollments still `starting` are retried by the router's periodic sweep.
        quiet["runs_by_status"] = {
            r["status"]: int(r["n"])
            for r in await pool.fetch("SELECT status, count(*) AS n FROM journey_runs GROUP BY 1")
        }
        log(f"    settled: {quiet}")
        stack.check_alive()

        # (b) latency ------------------------------------------------------------------
        log(f"(b) latency: {args.samples} x Signed Up -> welcome message, one at a time")
        res["ours"]["latency"] = await ours_latency(
            stack, pool, listener, client, roots, args, res, tag=tag, phase="b_latency"
        )
        stack.check_alive()

        # (c) raw Temporal ---------------------------------------------------------------
        await raw.ensure_table(pool)
        raw_pool = await create_pool(stack.db_url, max_size=20)
        acts = raw.RawActivities(raw_pool)
        raw_queue = f"bench-raw-{tag}"
        try:
            async with raw.raw_worker(client, acts, raw_queue):
                log("warm-up: 5 raw signal-with-starts")
                await raw.run_latency(
                    client, acts, raw_queue, tag=f"warm{tag}", samples=5, gap=0.05, limit_s=60
                )
                log(f"(c1) raw ingestion: {args.raw_concurrency} callers, one SWS per event, "
                    f"{args.duration:.0f} s")  # fmt: skip
                raw_mix = load.EventMix(args.users, args.seed, f"r{tag}")
                meter = CpuMeter(roots).start()
                ri = await raw.run_ingestion(
                    client,
                    acts,
                    raw_queue,
                    raw_mix.next,
                    tag=tag,
                    duration=args.duration,
                    concurrency=args.raw_concurrency,
                    drain_timeout=args.drain_timeout,
                )
                res["cpu"]["c1_raw_ingestion"] = meter.stop()
                res["raw"]["ingestion"] = ri
                ri["settle"] = await quiesce(
                    roots,
                    ["temporal", "bench"],
                    limit_s=min(args.settle_timeout, 60.0),
                    idle_cores=idle + 0.15,
                )
                log(f"    accepted {ri['accepted_events']} SWS, {ri['accepted_per_s']}/s; "
                    f"end-to-end {ri['end_to_end_per_s']}/s")  # fmt: skip

                log(f"(c2) raw latency: {args.samples} x SWS -> activity, one at a time")
                meter = CpuMeter(roots).start()
                rs = await raw.run_latency(
                    client,
                    acts,
                    raw_queue,
                    tag=tag,
                    samples=args.samples,
                    gap=args.gap_ms / 1000,
                    limit_s=args.sample_timeout,
                    budget_s=args.latency_budget,
                )
                res["cpu"]["c2_raw_latency"] = meter.stop()
        finally:
            await raw_pool.close()
        await add_history_marks(client, rs)
        rl = _lat_summary(rs)
        res["raw"]["latency"] = {
            "summary": rl,
            "sws_call_ms": summary([s["call_ms"] for s in rs]),
            "stages_ms": stages(rs, RAW_STAGES),
            "samples": _round_samples(rs),
        }
        log(f"    p50 {rl.get('p50')} ms, p99 {rl.get('p99')} ms, timeouts {rl['timeouts']}")
        stack.check_alive()
    finally:
        await listener.close()
        await pool.close()


def write_results(res: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = res["started_at"].replace(":", "").replace("-", "")
    path = out / f"bench-{stamp}.json"
    text = json.dumps(res, indent=2, default=str)
    path.write_text(text)
    (out / "latest.json").write_text(text)
    return path


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC).replace(microsecond=0)
    res: dict[str, Any] = {
        "schema": 1,
        "started_at": started.isoformat().replace("+00:00", "Z"),
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "targets": {
            "ingestion_events_per_s": TARGET_EVENTS_PER_S,
            "latency_p99_vs_raw_p99": TARGET_LATENCY_FACTOR,
        },
        "machine": machine_info(find_binary("temporal")),
        "code_at_start": code_fingerprint(),
        "ours": {},
        "raw": {},
        "cpu": {},
    }
    stamp = res["started_at"].replace(":", "").replace("-", "")
    stack = Stack(keep_logs=args.out / f"logs-{stamp}" if args.keep_logs else None)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    code = 0
    t0 = time.monotonic()
    try:
        log(f"stack in {stack.tmp}: starting PostgreSQL and the Temporal dev server")
        stack.start_servers()
        asyncio.run(bench(stack, args, res))
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        res["error"] = "interrupted"
        code = 130
    except Exception as err:
        log(f"FAILED: {err!r}")
        res["error"] = "".join(traceback.format_exception(err))
        code = 1
    finally:
        res["logs"] = stack.log_problems() if stack.logs.exists() else {}
        log("stopping the API, the worker, Temporal and PostgreSQL")
        stack.stop()
    res["code_at_end"] = code_fingerprint()
    if res["code_at_end"]["sha256_app_py"] != res["code_at_start"]["sha256_app_py"]:
        res["warning"] = "app code changed during the run: worker/API run what was loaded at start"
    res["finished_at"] = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    res["wall_s"] = round(time.monotonic() - t0, 1)
    res["interference_others_cores_busy"] = {
        phase: m.get("others_cores_busy") for phase, m in res["cpu"].items()
    }
    rows = build_table(res)
    res["table"] = rows
    met = [r["met"] for r in rows if r["met"] is not None]
    res["all_targets_met"] = bool(met) and all(met) and "error" not in res
    path = write_results(res, args.out)
    print()
    print(format_table(rows))
    for r in rows:
        if r.get("note"):
            print(f"  {r['metric']}: {r['note']}")
    busy = {k: v for k, v in res["interference_others_cores_busy"].items() if (v or 0) > 0.2}
    if busy:
        print(f"\nNOTE: other processes on this machine used CPU during the run (cores): {busy}")
    ing = res["ours"].get("ingestion", {})
    if ing and not ing.get("drained"):
        print(f"\nNOTE: the router did not drain within {args.drain_timeout:.0f} s "
              f"({ing.get('unrouted_after_drain_wait')} events left).")  # fmt: skip
    print(f"\nresults: {path}  (and {args.out / 'latest.json'})")
    if "error" in res:
        print(f"run did not complete: {res['error'].splitlines()[-1]}")
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
