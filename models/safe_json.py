"""JSON we can store: what PostgreSQL (text, jsonb) and our own JSON encoding can hold.

Python's `json` module accepts inputs that are valid JSON text (or that it accepts beyond
JSON) but that break later, far from the request: `NaN`/`Infinity` literals and `1e400` (an
infinite float) are not JSON numbers and jsonb refuses them; `"\\ud800"` decodes to a lone
surrogate that UTF-8 cannot encode; `"\\u0000"` decodes to NUL, which PostgreSQL text and jsonb
refuse; very deep nesting overflows the recursion of every encoder on the way. Each would be a
500 (and Segment clients retry 5xx forever), so the API refuses them up front with a 400 that
names the field: `loads` is the one JSON parser of the API, `find_unsafe` the one check.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64  # nested objects/arrays; far beyond any real event, journey or template
_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_$@\-]+$")


class UnsafeJson(ValueError):
    """A value the API cannot store; `field` names where it is (`batch[3].properties.x`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def loads(raw: bytes | str) -> Any:
    """Parse JSON strictly: no NaN/Infinity literals; nesting too deep for the parser is a
    ValueError (not a RecursionError). The result may still hold unsafe values: see
    `find_unsafe`.

    Raises:
        ValueError: not JSON (json.JSONDecodeError and UnicodeDecodeError are ValueErrors).
    """
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None


def field_name(prefix: str, key: str) -> str:
    """`prefix.key` for a plain key; an unusual key (spaces, NUL, a surrogate) JSON-quoted
    with escapes, so an error message never carries the bad character itself."""
    part = key if _PLAIN_KEY.match(key) else json.dumps(key, ensure_ascii=True)
    return f"{prefix}.{part}" if prefix else part


def _problem(text: str) -> str | None:
    bad = _BAD_CHAR.search(text)
    if bad is None:
        return None
    if bad.group() == "\x00":
        return "contains a NUL character (\\u0000)"
    return f"contains a lone surrogate (\\u{ord(bad.group()):04x}); not valid Unicode"


def find_unsafe(value: Any, where: str = "", *, max_depth: int = MAX_DEPTH) -> None:
    """Check every key and value, iteratively (no recursion to overflow).

    Raises:
        UnsafeJson: the first NUL or lone surrogate (key or string), non-finite number, or
            nesting deeper than `max_depth`, naming its field (`where` prefixes the name).
    """
    todo: list[tuple[Any, str, int]] = [(value, where, 0)]
    while todo:
        item, path, depth = todo.pop()
        if isinstance(item, str):
            if problem := _problem(item):
                raise UnsafeJson(path or "body", problem)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise UnsafeJson(path or "body", "number out of range (not a finite number)")
        elif isinstance(item, dict | list):
            if depth >= max_depth:
                raise UnsafeJson(path or "body", f"nested more than {max_depth} levels deep")
            if isinstance(item, list):
                todo.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item))
                continue
            for k, v in item.items():
                if isinstance(k, str) and (problem := _problem(k)):
                    raise UnsafeJson(path or "body", f"a key {problem}")
                todo.append((v, field_name(path, str(k)), depth + 1))


def loads_safe(raw: bytes | str, where: str = "") -> Any:
    """`loads` then `find_unsafe`: JSON the API can store, or an error naming the field.

    Raises:
        ValueError: not JSON; UnsafeJson (a ValueError too): JSON we cannot store.
    """
    value = loads(raw)
    find_unsafe(value, where)
    return value
