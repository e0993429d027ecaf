"""Worker and API as real processes; events from the real Segment client (analytics-python)."""

from __future__ import annotations

import asyncio

import httpx
from segment.analytics import Client as SegmentClient
from temporalio.testing import WorkflowEnvironment

from core.temporal import JOURNEY_STATUS, JOURNEY_STEP
from models.runtime import JourneyRunResult
from tests.conftest import eventually
from tests.e2e.conftest import WRITE_KEY, Stack, admin
from workflows.journey import workflow_id_for

FAST_CART = {
    "id": "fast_cart",
    "name": "Fast cart recovery",
    "entry": {"type": "track", "event": "Product Added"},
    "exit_on": [{"event": "Order Completed"}],
    "steps": [
        {"id": "wait_a_moment", "kind": "wait", "duration": "1s"},
        {
            "id": "reminder",
            "kind": "send",
            "template": {"subject": "Still want {{ event.properties.name }}?", "body": "Come back"},
        },
        {"id": "wait_again", "kind": "wait", "duration": "1s"},
        {"id": "last_call", "kind": "send", "template": {"body": "Last call"}},
    ],
}


async def _customer(api: httpx.AsyncClient, ref: str) -> dict:
    async def found() -> dict | None:
        r = await api.get(f"/v1/customers/{ref}", headers=admin())
        return r.json() if r.status_code == 200 else None

    return await eventually(found, what=f"customer {ref} to be routed")


async def test_segment_client_to_messages_and_search_attributes(
    stack: Stack, dev_env: WorkflowEnvironment
):
    stack.start_worker()
    stack.start_api()
    async with httpx.AsyncClient(base_url=stack.api_url) as api:
        r = await api.post("/v1/journeys", json=FAST_CART, headers=admin())
        assert r.status_code == 200, r.text

        segment = SegmentClient(WRITE_KEY, host=stack.api_url, max_retries=1, upload_size=100)
        errors: list[Exception] = []
        segment.on_error = lambda e, _batch: errors.append(e)
        segment.identify("shopper", {"email": "shopper@example.com", "first_name": "Sam"})
        segment.track("shopper", "Product Added", {"name": "Kettle", "price": 30})
        segment.track("buyer", "Product Added", {"name": "Toaster"})
        segment.track("buyer", "Order Completed", {"order_id": "o-1", "total": 25})
        segment.track("buyer", "Some Unknown Event", {"x": 1})
        await asyncio.to_thread(segment.flush)
        assert errors == []

        shopper = (await _customer(api, "shopper"))["id"]
        buyer = (await _customer(api, "buyer"))["id"]
        client = dev_env.client
        done = await client.get_workflow_handle(
            workflow_id_for("fast_cart", shopper), result_type=JourneyRunResult
        ).result()
        assert (done.status, done.sends) == ("completed", 2)
        exited = await client.get_workflow_handle(
            workflow_id_for("fast_cart", buyer), result_type=JourneyRunResult
        ).result()
        assert (exited.status, exited.sends) == ("exited", 0)

        msgs = (await api.get("/v1/customers/shopper/messages", headers=admin())).json()["items"]
        assert [m["step_id"] for m in reversed(msgs)] == ["reminder", "last_call"]
        assert msgs[-1]["subject"] == "Still want Kettle?"
        assert all(m["status"] == "sent" for m in msgs)
        buyer_msgs = (await api.get("/v1/customers/buyer/messages", headers=admin())).json()
        assert buyer_msgs["items"] == []
        # The unknown event is stored, attached to the customer, and ignored by journeys.
        events = (await api.get("/v1/customers/buyer/events", headers=admin())).json()["items"]
        assert "Some Unknown Event" in [e["event"] for e in events]

        desc = await client.get_workflow_handle(workflow_id_for("fast_cart", buyer)).describe()
        assert desc.typed_search_attributes.get(JOURNEY_STATUS) == "exited"
        assert desc.typed_search_attributes.get(JOURNEY_STEP) == "(finished)"

        async def listed() -> list[str]:
            q = f'JourneyId="fast_cart" AND CustomerId="{shopper}" AND JourneyStatus="completed"'
            return [w.id async for w in client.list_workflows(q)]

        assert await eventually(listed, what="visibility to list the run") == [
            workflow_id_for("fast_cart", shopper)
        ]
        runs = (await api.get("/v1/customers/shopper/journeys", headers=admin())).json()
        assert [(r["journey_id"], r["status"]) for r in runs] == [("fast_cart", "completed")]
        assert [h["step_id"] for h in runs[0]["history"]] == [
            "wait_a_moment", "reminder", "wait_again", "last_call",
        ]  # fmt: skip
