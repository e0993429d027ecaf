"""Hand-off to a human: a task is created, listed, notified; closing it resumes the run."""

from __future__ import annotations

import httpx
import pytest

from models.runtime import RunSummary
from tests.conftest import eventually
from tests.harness import ADMIN, Engine, engine, identify, track
from tests.receiver import Receiver


def _journey(notify: str) -> dict:
    return {
        "id": "vip_handoff",
        "name": "VIP hand-off",
        "entry": {"event": "Big Cart"},
        "steps": [
            {"id": "call_them", "kind": "handoff", "queue": "sales",
             "title": "Call {{ profile.name }} about {{ event.properties.total }}",
             "details": {"email": "{{ profile.email }}"}, "notify_url": notify,
             "wait": True, "timeout": "3d", "on_timeout": "no_answer"},
            {"id": "won", "kind": "branch", "else": "end", "cases": [
                {"when": {"path": "results.call_them.outcome", "op": "eq", "value": "won"},
                 "next": "thanks"}]},
            {"id": "thanks", "kind": "send", "template": {"body": "welcome aboard"}, "next": "end"},
            {"id": "no_answer", "kind": "send", "template": {"body": "we tried to call"}},
        ],
    }  # fmt: skip


@pytest.fixture
async def help_desk(desk, receiver) -> tuple[Engine, httpx.AsyncClient]:
    eng, api = desk
    await eng.publish(_journey(f"{receiver}/tasks"))
    return eng, api


async def test_closing_the_task_resumes_the_run_with_its_outcome(help_desk):
    eng, api = help_desk
    await eng.send(identify("vip", name="Vera", email="vera@example.com"))
    await eng.send(track("vip", "Big Cart", total=1200))

    async def open_task() -> list[dict]:
        return (await api.get("/v1/tasks?queue=sales", headers=ADMIN)).json()

    tasks = await eventually(open_task, what="the hand-off task")
    assert len(tasks) == 1
    task = tasks[0]
    assert task["title"] == "Call Vera about 1200"
    assert task["details"] == {"email": "vera@example.com"}
    assert task["status"] == "open"
    handle = await eng.run("vip_handoff", "vip")

    async def waiting() -> RunSummary | None:
        # The run waits once the task is stored and its notification delivered.
        summary = await handle.query("summary", result_type=RunSummary)
        return summary if summary.step_deadline is not None else None

    summary = await eventually(waiting, what="the run to wait for the task")
    assert summary.step_id == "call_them"
    assert [c["body"]["task_id"] for c in Receiver.calls] == [task["id"]]
    assert Receiver.calls[0]["key"]

    r = await api.post(f"/v1/tasks/{task['id']}/close", json={"outcome": "won"}, headers=ADMIN)
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["outcome"]) == ("closed", "won")
    result = await handle.result()
    assert result.steps == ["call_them", "won", "thanks"]
    assert [m["body"] for m in await eng.messages("vip")] == ["welcome aboard"]
    again = await api.post(f"/v1/tasks/{task['id']}/close", json={"outcome": "lost"}, headers=ADMIN)
    assert again.json()["outcome"] == "won"  # closing twice changes nothing
    assert (await api.get("/v1/tasks?queue=sales", headers=ADMIN)).json() == []
    closed = (await api.get("/v1/tasks?status=closed", headers=ADMIN)).json()
    assert [t["id"] for t in closed] == [task["id"]]
    assert (await api.post("/v1/tasks/999999/close", json={}, headers=ADMIN)).status_code == 404
    assert (await api.get("/v1/tasks")).status_code == 401


async def test_an_unanswered_task_times_out_to_its_branch(db, ts_env, receiver):
    async with engine(db, ts_env) as eng:
        await eng.publish(_journey(f"{receiver}/tasks"))
        await eng.send(identify("slow", name="Sam", email="s@example.com"))
        await eng.send(track("slow", "Big Cart", total=900))
        result = await eng.result(await eng.run("vip_handoff", "slow"))
        assert result.steps == ["call_them", "no_answer"]
        assert await db.fetchval("SELECT status FROM tasks") == "open"
