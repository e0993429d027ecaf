from tests.api.conftest import ADMIN, WRITE


async def test_track_is_stored_once_and_readable(api, db):
    body = {"userId": "u1", "event": "Product Added", "messageId": "m-1", "properties": {"a": 1}}
    r = await api.post("/v1/track", json=body, auth=WRITE)
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True}
    r = await api.post("/v1/track", json=body, auth=WRITE)
    assert r.status_code == 200
    assert await db.fetchval("SELECT count(*) FROM events WHERE message_id = 'm-1'") == 1
    r = await api.get("/health/live")  # /health would also need a worker (test_health.py)
    assert r.json() == {"status": "ok"}
    r = await api.get("/v1/customers/u1", headers=ADMIN)
    assert r.status_code == 404  # not routed yet: no worker in this test
