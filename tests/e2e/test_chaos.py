"""`make chaos` in small: a few hundred events through `/v1/batch` into journeys that send
email (real SMTP server), SMS and webhooks (real HTTP provider), while `worker.py` is SIGKILLed
twice, the Temporal dev server is SIGKILLed and restarted on its SQLite file, and PostgreSQL
is stopped (immediate mode: a crash) and restarted on its data dir.

Every accepted event is routed, every expected message arrives, nothing twice at the HTTP
provider; SMTP repeats only with the same Message-ID, in the window the README documents.
The run has its own stack (bench/chaos.py), since it restarts the servers.
"""

from __future__ import annotations

import json

from bench.chaos import Params, run_chaos

SMALL = Params(
    events=300,
    rate=25.0,  # about 12 s of posting, so every fault lands while events arrive
    batch_size=20,
    clients=4,
    worker_kills=2,
    temporal_restarts=1,
    postgres_restarts=1,
    drain_timeout=90.0,  # a send held by a killed worker is retried after its 30 s timeout
)


async def test_events_and_sends_survive_kills_and_restarts():
    res = await run_chaos(SMALL)

    assert "error" not in res, res["error"]
    failed = [c for c in res["checks"] if c["ok"] is False]
    assert not failed, json.dumps(
        {"failed": failed, "final": res["final"], "faults": res["faults"], "logs": res["logs"]},
        indent=1,
        default=str,
    )
    # The run did what it claims: faults while events arrived, messages on every channel.
    kinds = sorted(f["kind"] for f in res["faults"])
    assert kinds == ["postgres", "temporal", "worker", "worker"]
    expected = res["ledger"]["expected"]
    assert res["ledger"]["accepted"] == SMALL.events
    assert expected["emails"] > 0 and expected["sms"] > 0
