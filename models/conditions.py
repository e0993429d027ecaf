"""A typed JSON condition tree: safe (no eval), deterministic, checked when a journey is published.

    {"path": "event.properties.price", "op": "gte", "value": 50}
    {"all": [{"path": "profile.traits.plan", "op": "eq", "value": "pro"},
             {"not": {"path": "profile.stats.events.Order Completed", "op": "exists"}}]}

Paths start at a root: `event` (the event being matched; in a branch, the entry event),
`entry` (the event that started the run), `trigger` (the latest event that moved the run: the
entry event, then the event each `wait_for` matched), `profile` (`traits`, `stats`; in a branch),
`results` (earlier step results). What each root holds, and where, is declared in
`models.context` and checked at publish (`models.validation`). Missing values are null;
comparing values of different types is false, never an error.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models.loading import DefinitionModel, at_runtime

Op = Literal[
    "eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "contains", "starts_with",
    "exists", "not_exists",
]  # fmt: skip
ROOTS = ("event", "entry", "trigger", "profile", "results")


# Roots people reach for, and where that data is in a condition.
_ROOT_HINTS = {
    "customer": "profile",
    "traits": "profile.traits",
    "properties": "event.properties",
    "stats": "profile.stats",
    "result": "results",
}


def _hint(path: str) -> str:
    """` (did you mean profile.traits.plan?)` for a path with an unknown root."""
    root, _, rest = path.partition(".")
    fix = _ROOT_HINTS.get(root) or next(iter(difflib.get_close_matches(root, ROOTS, 1)), None)
    if fix is None:
        return ""
    return f" (did you mean {'.'.join(x for x in (fix, rest) if x)}?)"


class Compare(DefinitionModel):
    """Checked at publish; a run evaluates what was published (models.loading)."""

    path: str = Field(
        description="dotted path from a root: event, entry, trigger, profile, results"
    )
    op: Op
    value: Any = None
    value_from: str | None = Field(
        default=None,
        description="compare with the value at this path instead of `value`, e.g. "
        "entry.properties.appointment_id (correlation)",
    )

    @field_validator("path")
    @classmethod
    def _known_root(cls, v: str, info: ValidationInfo) -> str:
        if at_runtime(info):
            return v
        if v.split(".", 1)[0] not in ROOTS:
            raise ValueError(f"path {v!r} must start with one of {', '.join(ROOTS)}{_hint(v)}")
        return v

    @model_validator(mode="after")
    def _value_fits_op(self, info: ValidationInfo) -> Compare:
        if at_runtime(info):
            return self  # evaluating a mismatched type is false, never an error
        if self.value_from is not None:
            if self.value is not None:
                raise ValueError("give value or value_from, not both")
            if self.value_from.split(".", 1)[0] not in ROOTS:
                raise ValueError(
                    f"value_from {self.value_from!r} must start with one of "
                    f"{', '.join(ROOTS)}{_hint(self.value_from)}"
                )
            return self
        v = self.value
        if self.op in ("gt", "gte", "lt", "lte") and (
            isinstance(v, bool) or not isinstance(v, int | float | str)
        ):
            raise ValueError(f"{self.op} needs a number or string value, got {v!r}")
        if self.op in ("in", "not_in") and not isinstance(v, list):
            raise ValueError(f"{self.op} needs a list value, got {v!r}")
        if self.op == "starts_with" and not isinstance(v, str):
            raise ValueError(f"starts_with needs a string value, got {v!r}")
        if self.op in ("exists", "not_exists") and v is not None:
            raise ValueError(f"{self.op} takes no value")
        return self


class AllOf(DefinitionModel):
    all: list[Condition]


class AnyOf(DefinitionModel):
    any: list[Condition]


class Not(DefinitionModel):
    not_: Condition = Field(alias="not")


def _kind(v: Any) -> str:
    if isinstance(v, BaseModel):
        return type(v).__name__
    if isinstance(v, dict):
        for key, tag in (("all", "AllOf"), ("any", "AnyOf"), ("not", "Not"), ("not_", "Not")):
            if key in v:
                return tag
    return "Compare"


Condition = Annotated[
    Annotated[Compare, Tag("Compare")]
    | Annotated[AllOf, Tag("AllOf")]
    | Annotated[AnyOf, Tag("AnyOf")]
    | Annotated[Not, Tag("Not")],
    Discriminator(_kind),
]
for _m in (AllOf, AnyOf, Not):
    _m.model_rebuild()

_MISSING = object()


def resolve(path: str, ctx: dict[str, Any]) -> Any:
    """Walk a dotted path; a key may itself contain spaces (event names do)."""
    node: Any = ctx
    parts = path.split(".")
    i = 0
    while i < len(parts):
        if not isinstance(node, dict):
            return None
        # Greedy match so `stats.events.Order Completed` and keys with dots both work.
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if key in node:
                node = node[key]
                i = j
                break
        else:
            return None
    return node


def _compare(op: str, left: Any, right: Any) -> bool:
    try:
        if op == "eq":
            return bool(left == right)
        if op == "ne":
            return bool(left != right)
        if op in ("gt", "gte", "lt", "lte"):
            if left is None or right is None:
                return False
            if isinstance(left, bool) or isinstance(right, bool):
                return False
            if isinstance(left, int | float) != isinstance(right, int | float):
                return False
            return {
                "gt": left > right,
                "gte": left >= right,
                "lt": left < right,
                "lte": left <= right,
            }[op]
        if op == "in":
            return isinstance(right, list) and left in right
        if op == "not_in":
            return isinstance(right, list) and left not in right
        if op == "contains":
            if isinstance(left, list | str) and not (isinstance(left, str) and right is None):
                return right in left
            return False
        if op == "starts_with":
            return isinstance(left, str) and isinstance(right, str) and left.startswith(right)
    except TypeError:
        return False
    raise ValueError(f"unknown operator {op!r}")


def evaluate(cond: Condition | None, ctx: dict[str, Any]) -> bool:
    if cond is None:
        return True
    if isinstance(cond, AllOf):
        return all(evaluate(c, ctx) for c in cond.all)
    if isinstance(cond, AnyOf):
        return any(evaluate(c, ctx) for c in cond.any)
    if isinstance(cond, Not):
        return not evaluate(cond.not_, ctx)
    value = resolve(cond.path, ctx)
    if cond.op == "exists":
        return value is not None
    if cond.op == "not_exists":
        return value is None
    other = resolve(cond.value_from, ctx) if cond.value_from else cond.value
    if cond.value_from and other is None:
        return False  # nothing to correlate with
    return _compare(cond.op, value, other)
