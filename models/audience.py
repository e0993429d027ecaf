"""Audiences: a condition over profiles (the same condition tree journeys use), compiled to a
parameterised SQL predicate over `customers c`. Only `profile.*` paths mean something here:

    profile.traits.<key>                 the trait's JSON value
    profile.stats.events.<Event Name>    how many such events the customer sent

Anything else is refused when the launch is created, naming the path. JSON parameters are
passed as Python values: the pool's jsonb codec encodes them.
"""

from __future__ import annotations

from typing import Any

from models.conditions import AllOf, AnyOf, Compare, Condition, Not


class AudienceError(ValueError):
    """An audience condition that cannot be expressed over profiles (names the path)."""


class _Sql:
    def __init__(self) -> None:
        self.params: list[Any] = []

    def p(self, value: Any) -> str:
        self.params.append(value)
        return f"${len(self.params)}"


def _trait(sql: _Sql, key: str, cmp: Compare) -> str:
    k = sql.p(key)
    value = f"c.traits -> {k}"
    text = f"c.traits ->> {k}"
    v = cmp.value
    if cmp.op == "exists":
        return f"(c.traits ? {k} AND {value} <> 'null'::jsonb)"
    if cmp.op == "not_exists":
        return f"NOT (c.traits ? {k} AND {value} <> 'null'::jsonb)"
    if cmp.op in ("eq", "ne"):
        test = f"{value} = {sql.p(v)}::jsonb"
        return test if cmp.op == "eq" else f"NOT coalesce({test}, false)"
    if cmp.op in ("gt", "gte", "lt", "lte"):
        sym = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}[cmp.op]
        if isinstance(v, int | float):
            return (
                f"(jsonb_typeof({value}) = 'number' AND ({text})::numeric {sym} "
                f"{sql.p(v)}::numeric)"
            )
        return f"(jsonb_typeof({value}) = 'string' AND {text} {sym} {sql.p(str(v))})"
    if cmp.op in ("in", "not_in"):
        test = f"{value} = ANY({sql.p(list(v))}::jsonb[])"
        return test if cmp.op == "in" else f"NOT coalesce({test}, false)"
    if cmp.op == "contains":
        return (
            f"(({value} @> {sql.p([v])}::jsonb) OR (jsonb_typeof({value}) = 'string'"
            f" AND strpos({text}, {sql.p(str(v))}) > 0))"
        )
    if cmp.op == "starts_with":
        return f"starts_with({text}, {sql.p(str(v))})"
    raise AudienceError(f"{cmp.path}: operator {cmp.op} is not supported in audiences")


def _event_count(sql: _Sql, name: str, cmp: Compare) -> str:
    count = (
        "(SELECT count(*) FROM events e WHERE e.customer_id = c.id AND e.type = 'track' "
        f"AND e.event = {sql.p(name)})"
    )
    if cmp.op == "exists":
        return f"{count} > 0"
    if cmp.op == "not_exists":
        return f"{count} = 0"
    sym = {"eq": "=", "ne": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}.get(cmp.op)
    if sym is None or not isinstance(cmp.value, int) or isinstance(cmp.value, bool):
        raise AudienceError(f"{cmp.path}: event counts compare with a number (eq, gt, ...)")
    return f"{count} {sym} {sql.p(cmp.value)}"


def _compile(sql: _Sql, cond: Any) -> str:
    if isinstance(cond, AllOf):
        return "(" + " AND ".join(_compile(sql, c) for c in cond.all) + ")" if cond.all else "true"
    if isinstance(cond, AnyOf):
        return "(" + " OR ".join(_compile(sql, c) for c in cond.any) + ")" if cond.any else "false"
    if isinstance(cond, Not):
        return f"NOT coalesce({_compile(sql, cond.not_)}, false)"
    assert isinstance(cond, Compare)
    if cond.value_from is not None:
        raise AudienceError(f"{cond.path}: value_from is not supported in audiences")
    parts = cond.path.split(".", 3)
    if parts[:2] == ["profile", "traits"] and len(parts) >= 3:
        return _trait(sql, ".".join(parts[2:]), cond)
    if parts[:3] == ["profile", "stats", "events"] and len(parts) == 4:
        return _event_count(sql, parts[3], cond)
    raise AudienceError(
        f"{cond.path}: audiences read profile.traits.<key> or profile.stats.events.<name>"
    )


def compile_audience(cond: Condition | None) -> tuple[str, list[Any]]:
    """(predicate, params) over `customers c`; merged-away profiles never match."""
    sql = _Sql()
    where = _compile(sql, cond) if cond is not None else "true"
    return f"c.merged_into IS NULL AND coalesce({where}, false)", sql.params
