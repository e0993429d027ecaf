"""Two ways to read a journey definition: strictly when it is published, leniently when a run
loads it from workflow history.

A definition travels inside workflow input and continue-as-new state, so a run replays and
continues with whatever an older release wrote. Everything that only helps authors (unknown
fields refused, id patterns, bounds, cross-field rules) is checked at publish and not again at
run time: dropping a field or tightening a rule in a later release then never fails a run in
flight. Types and the step `kind` still decide the shape at run time.

- Publish (the default, `Model.model_validate(data)`): every check.
- Run time (`Model.model_validate(data, context=RUNTIME)`, or a `Runtime[...]` field of a
  workflow payload, which sets that context itself): unknown fields ignored, author checks
  skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, WrapValidator, model_validator
from pydantic_core import PydanticCustomError, core_schema

RUNTIME: dict[str, Any] = {"runtime": True}


def at_runtime(info: ValidationInfo | None) -> bool:
    """True when a run loads the definition (skip the checks that only help authors)."""
    ctx = info.context if info is not None else None
    return isinstance(ctx, dict) and bool(ctx.get("runtime"))


class DefinitionModel(BaseModel):
    """Base of every definition schema class: strict at publish, lenient at run time."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _ignore_unknown_at_runtime(cls, data: Any, info: ValidationInfo) -> Any:
        if not at_runtime(info) or not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        known |= {f.alias for f in cls.model_fields.values() if f.alias}
        return {k: v for k, v in data.items() if k in known}


@dataclass(frozen=True)
class Checked:
    """Field constraints checked at publish only (shown in the JSON schema for editors).
    `Annotated[str, Checked(pattern=...)]` instead of `Field(pattern=...)`."""

    pattern: str | None = None
    max_length: int | None = None
    min_length: int | None = None
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.with_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        out = handler(schema)
        is_list = out.get("type") == "array"
        keys = {
            "pattern": self.pattern,
            "maxItems" if is_list else "maxLength": self.max_length,
            "minItems" if is_list else "minLength": self.min_length,
            "exclusiveMinimum": self.gt,
            "minimum": self.ge,
            "exclusiveMaximum": self.lt,
            "maximum": self.le,
        }
        out.update({k: v for k, v in keys.items() if v is not None})
        return out

    def _check(self, value: Any, info: ValidationInfo) -> Any:
        if at_runtime(info) or value is None:
            return value
        # The same error types and words as pydantic's own constraints.
        if self.pattern is not None and not re.search(self.pattern, value):
            raise PydanticCustomError(
                "string_pattern_mismatch",
                "String should match pattern '{pattern}'",
                {"pattern": self.pattern},
            )
        if self.max_length is not None and len(value) > self.max_length:
            raise PydanticCustomError(
                "too_long",
                "Value should have at most {n} characters or items",
                {"n": self.max_length},
            )
        if self.min_length is not None and len(value) < self.min_length:
            raise PydanticCustomError(
                "too_short", "Value should have at least {n} item(s)", {"n": self.min_length}
            )
        for bound, ok, kind, word in (
            (self.gt, lambda b: value > b, "greater_than", "greater than"),
            (self.ge, lambda b: value >= b, "greater_than_equal", "greater than or equal to"),
            (self.lt, lambda b: value < b, "less_than", "less than"),
            (self.le, lambda b: value <= b, "less_than_equal", "less than or equal to"),
        ):
            if bound is not None and not ok(bound):
                raise PydanticCustomError(
                    kind, f"Input should be {word} {{bound}}", {"bound": bound}
                )
        return value


M = TypeVar("M", bound=BaseModel)


def runtime_model(model: type[M]) -> Any:
    """`Annotated[model, ...]` for workflow payload fields: a dict from history is validated
    with the run-time context whatever the caller's context (the data converter has none)."""

    def load(value: Any, handler: Any) -> M:
        if isinstance(value, model):
            return value
        return model.model_validate(value, context=RUNTIME)

    return Annotated[model, WrapValidator(load)]
