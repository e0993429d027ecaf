"""The real RudderStack Python SDK (gzip by default) against the API under uvicorn.

RudderStack puts identify traits in `context.traits` (not top-level `traits`); the Segment
spec lets `track` carry `context.traits` too. Both must reach the profile.
"""

from __future__ import annotations

import asyncio

from rudderstack.analytics import Client as RudderClient

from tests.api.conftest import WRITE_KEY
from tests.api.live_server import live_api
from tests.harness import engine


async def test_rudderstack_identify_and_track_traits_reach_the_profile(db, settings, dev_env):
    async with live_api(settings) as url, engine(db, dev_env) as eng:
        errors: list[Exception] = []
        rudder = RudderClient(WRITE_KEY, host=url, sync_mode=True, max_retries=1)
        rudder.on_error = lambda e, _batch: errors.append(e)

        def send() -> None:
            rudder.identify("ruth", {"email": "ruth@example.com", "first_name": "Ruth"})
            rudder.track(
                "ruth",
                "Product Added",
                {"name": "Mug"},
                context={"traits": {"plan": "pro", "first_name": "Ruthie"}},
            )
            rudder.identify("ruth", {"plan": "team"}, context={"traits": {"plan": "ignored"}})

        await asyncio.to_thread(send)
        assert errors == []
        stored = await db.fetch("SELECT payload FROM events ORDER BY id")
        assert len(stored) == 3
        while await eng.router.route_once():
            pass
        cid = await eng.customer("ruth")
        traits = await db.fetchval("SELECT traits FROM customers WHERE id = $1", cid)
    # identify: context.traits applied; track: context.traits applied; top-level traits win.
    assert traits == {
        "email": "ruth@example.com",
        "first_name": "Ruthie",
        "plan": "team",
    }
    assert await eng.customer("ruth@example.com") == cid
