from tests.api.conftest import ADMIN


async def test_definition_schema_is_served_for_editors(api):
    r = await api.get("/v1/journeys/schema", headers=ADMIN)
    assert r.status_code == 200
    schema = r.json()
    assert schema["title"] == "JourneyDefinition"
    assert {"id", "name", "entry", "steps", "goal", "re_entry"} <= set(schema["properties"])
    kinds = {
        d["properties"]["kind"]["const"]
        for name, d in schema["$defs"].items()
        if name.endswith("Step") and "kind" in d["properties"]
    }
    assert {"wait", "wait_for", "branch", "send", "split", "webhook", "goto"} <= kinds
    assert (await api.get("/v1/journeys/schema")).status_code == 401
