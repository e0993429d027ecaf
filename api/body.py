"""The one reader of request bodies that carry a definition (a journey, a template): JSON or
YAML, by `Content-Type`.

YAML (`application/yaml`, `text/yaml`, `application/x-yaml`) is what marketers write journeys
in (`journeys/*.yaml`); the API takes it as it is. `api.input_guard` checks only JSON and form
bodies, so YAML gets the same checks here (`models.definition_text.parse_yaml`: no aliases, no
tags, no NUL, NaN or deep nesting). Errors are 400 `{"code", "message"}` with the field, the
line and the column: `invalid_yaml`, `invalid_json`; a definition that does not validate is said
by `models.definition_errors` (routes answer `invalid_definition`, `invalid_request`).

Each route declares both media types in its OpenAPI request body (`openapi_body`).
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from api.errors import ApiError
from models.definition_errors import Problem, explain
from models.definition_text import ParsedText, TextError, as_mapping, parse_json, parse_yaml

YAML_TYPES = frozenset({"application/yaml", "text/yaml", "application/x-yaml"})
JSON_TYPE = "application/json"
M = TypeVar("M", bound=BaseModel)


def _kind(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_text(request: Request, what: str, *, required: bool = True) -> ParsedText | None:
    """The body as data with positions; None for an empty body when not `required`.

    Raises:
        ApiError: 415 for another media type; 400 for a body that does not parse, is not a
            mapping, or holds a value no route can store (naming field, line and column).
    """
    kind = _kind(request)
    is_yaml = kind in YAML_TYPES
    if not (is_yaml or kind in ("", JSON_TYPE) or kind.endswith("+json")):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type: {kind!r} is not accepted; send {JSON_TYPE} or application/yaml",
        )
    raw = await request.body()
    if not raw.strip():
        if required:
            raise ApiError(400, "invalid_request", f"body: {what} is required")
        return None
    try:
        parsed = parse_yaml(raw) if is_yaml else parse_json(raw)
        as_mapping(parsed, what)
    except TextError as err:
        code = "invalid_yaml" if is_yaml else "invalid_json"
        raise ApiError(400, code, f"body: {err}") from None
    return parsed


def said(problems: list[Problem]) -> str:
    return "; ".join(str(p) for p in problems)


def validated(parsed: ParsedText, model: type[M]) -> M:
    """`parsed` as `model`.

    Raises:
        ApiError: 400 `invalid_request`, each problem with its field, line and column.
    """
    try:
        return model.model_validate(parsed.data)
    except ValidationError as err:
        raise ApiError(400, "invalid_request", said(explain(err, parsed, model))) from None


def openapi_body(
    schema: dict[str, Any], description: str, *, required: bool = True
) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body with `read_text`: the same schema as
    JSON and as YAML."""
    return {
        "requestBody": {
            "required": required,
            "description": description,
            "content": {kind: {"schema": schema} for kind in (JSON_TYPE, "application/yaml")},
        }
    }
