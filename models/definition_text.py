"""Definitions as people write them: YAML or JSON text, read safely, with the line and column
of every field so an error can point at it.

YAML is read with the YAML 1.2 core schema, not PyYAML's YAML 1.1 one: `at: 10:30` stays the
string "10:30" (YAML 1.1 reads a base-60 integer, 630), `yes`/`no`/`on`/`off` stay strings,
dates stay strings (the definition is stored as JSON). Anything that is not plain JSON data is
refused with its line and column: aliases (`*name`, so no "billion laughs" expansion), tags
other than the core ones (`!!python/...`, `!!binary`, `!!set`), keys that are not scalars, a
key given twice (YAML 1.1 keeps the last one silently), and the values no route can store
(`models.safe_json.find_unsafe`: NUL, lone surrogates, `.nan`/`.inf`, nesting deeper than
MAX_DEPTH).

JSON keeps its own parser (`models.safe_json.loads`: `1e5` is a number in JSON, a string in
YAML); its positions come from composing the same text as YAML flow nodes (JSON is, nearly, a
subset of YAML flow style), only when an error needs them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from models.safe_json import MAX_DEPTH, UnsafeJson, find_unsafe, loads

Path = tuple[str | int, ...]

_CORE = "tag:yaml.org,2002:"
_LOADER_BASE: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present


class _CoreSchemaLoader(_LOADER_BASE):  # type: ignore[misc, valid-type]
    """Composes nodes only (never constructs Python objects), tagging plain scalars by the
    YAML 1.2 core schema."""

    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {}


for _tag, _pattern, _first in (
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+.0123456789"),
    ),
):
    _CoreSchemaLoader.add_implicit_resolver(_CORE + _tag, re.compile(_pattern), _first)


@dataclass(frozen=True)
class Position:
    """1-based, as editors count."""

    line: int
    column: int

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}"


def located(field: str, message: str, position: Position | None, *extra: str) -> str:
    """`steps[1].duration (step 'pause', line 10, column 5): <message>`: the one way every
    definition error names its place (field path, then anything known about it)."""
    about = ", ".join([*extra, str(position)] if position else extra)
    head = f"{field} ({about})" if field and about else field or about
    return f"{head}: {message}" if head else message


def _tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_CORE) if tag.startswith(_CORE) else tag


class TextError(ValueError):
    """Text that is not a definition we can read: says what is wrong and where."""

    def __init__(self, message: str, position: Position | None = None, field: str = "") -> None:
        super().__init__(located(field, message, position))
        self.message = message
        self.position = position
        self.field = field


@dataclass
class ParsedText:
    """The data, and where each field of it was written (`positions[("steps", 2, "duration")]`).
    `json` is JSON text whose positions are composed on first use (errors only)."""

    data: Any
    positions: dict[Path, Position] = field(default_factory=dict)
    json: str | bytes | None = field(default=None, repr=False)

    def position(self, path: Path) -> Position | None:
        """Where `path` was written, else its nearest enclosing field (a missing field: the
        mapping that lacks it)."""
        if self.json is not None:
            self.positions, self.json = _json_positions(self.json), None
        for end in range(len(path), -1, -1):
            found = self.positions.get(tuple(path[:end]))
            if found is not None:
                return found
        return None

    def with_data(self, data: Any) -> ParsedText:
        """The same positions for changed data (an `id` filled in from the path)."""
        return replace(self, data=data)


def _mark(mark: Any) -> Position | None:
    return Position(mark.line + 1, mark.column + 1) if mark is not None else None


def _yaml_error(err: yaml.YAMLError) -> TextError:
    """A PyYAML error in one sentence: the problem, where, and what it belongs to."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return TextError(f"not valid YAML: {err}")
    problem = err.problem or "not valid YAML"
    context = ""
    if err.context:
        started = _mark(err.context_mark)
        context = f" ({err.context}" + (f" at {started})" if started else ")")
    return TextError(f"{problem}{context}", _mark(err.problem_mark or err.context_mark))


def _scalar(node: ScalarNode, where: str) -> Any:
    tag = node.tag.removeprefix(_CORE)
    value: str = node.value
    if tag == "str":
        return value
    if tag == "null":
        return None
    if tag == "bool":
        return value.lower() == "true"
    try:
        if tag == "int":
            return int(value, 0) if value[:2] in ("0o", "0x") else int(value.replace("_", ""))
        if tag == "float":
            low = value.lower()
            if low.endswith(".inf"):
                return float("-inf") if low.startswith("-") else float("inf")
            return float("nan") if low == ".nan" else float(value)
    except ValueError:
        shown = repr(value[:40] + "…" if len(value) > 40 else value)
        raise TextError(f"{shown} is not a valid {tag}", _mark(node.start_mark), where) from None
    raise TextError(
        f"the tag {_tag(node.tag)} is not accepted; write plain text, numbers, true/false, null, "
        "lists and mappings",
        _mark(node.start_mark),
        where,
    )


def _field(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _data_of(root: Node) -> ParsedText:
    """The JSON data of a YAML node tree, and the position of every field; iterative (no
    recursion to overflow)."""
    positions: dict[Path, Position] = {(): _mark(root.start_mark)}  # type: ignore[dict-item]
    seen: set[int] = set()
    holder: list[Any] = [None]
    # (node, container, slot, path, depth)
    todo: list[tuple[Node, Any, Any, Path, int]] = [(root, holder, 0, (), 0)]
    while todo:
        node, into, slot, path, depth = todo.pop()
        where = _field(path) or "body"
        if id(node) in seen:
            raise _Alias
        seen.add(id(node))
        if isinstance(node, ScalarNode):
            into[slot] = _scalar(node, where)
            continue
        if depth >= MAX_DEPTH:
            raise TextError(f"nested more than {MAX_DEPTH} levels deep", _mark(node.start_mark))
        if node.tag not in (_CORE + "map", _CORE + "seq"):
            raise TextError(
                f"the tag {_tag(node.tag)} is not accepted; write plain lists and mappings",
                _mark(node.start_mark),
                where,
            )
        if isinstance(node, SequenceNode):
            items: list[Any] = [None] * len(node.value)
            into[slot] = items
            for i, item in enumerate(node.value):
                positions[(*path, i)] = _mark(item.start_mark)  # type: ignore[assignment]
                todo.append((item, items, i, (*path, i), depth + 1))
            continue
        assert isinstance(node, MappingNode)
        mapping: dict[str, Any] = {}
        into[slot] = mapping
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise TextError(
                    "a key must be plain text, not a list or mapping",
                    _mark(key_node.start_mark),
                    where,
                )
            key = key_node.value  # as written: `200:` is the key "200", as in JSON
            if key in mapping:
                first = positions.get((*path, key))
                raise TextError(
                    f"the key {key!r} is given twice" + (f" (first at {first})" if first else ""),
                    _mark(key_node.start_mark),
                    where,
                )
            mapping[key] = None
            positions[(*path, key)] = _mark(key_node.start_mark)  # type: ignore[assignment]
            todo.append((value_node, mapping, key, (*path, key), depth + 1))
    return ParsedText(holder[0], positions)


class _Alias(Exception):
    """A node met twice: the document uses an alias (found in the events for its place)."""


_ALIAS = "YAML aliases (*{}) are not accepted; write the value out"


def _alias_error(text: str) -> TextError:
    for event in yaml.parse(text, Loader=_CoreSchemaLoader):
        if isinstance(event, yaml.AliasEvent):
            return TextError(_ALIAS.format(event.anchor), _mark(event.start_mark))
    return TextError(_ALIAS.format("name"))


def parse_yaml(text: str | bytes) -> ParsedText:
    """One YAML document as JSON data, with positions.

    Raises:
        TextError: not YAML, or not plain JSON data, or a value no route can store; the
            message says what and where.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise TextError(f"not UTF-8 text (byte {err.start})") from None
    try:
        root = yaml.compose(text, Loader=_CoreSchemaLoader)
    except yaml.YAMLError as err:
        raise _yaml_error(err) from None
    except RecursionError:  # the pure-Python composer, without libyaml's nesting limit
        raise TextError(f"nested more than {MAX_DEPTH} levels deep") from None
    if root is None:
        return ParsedText(None, {})
    try:
        parsed = _data_of(root)
    except _Alias:
        raise _alias_error(text) from None
    _check_safe(parsed)
    return parsed


def _check_safe(parsed: ParsedText) -> None:
    try:
        find_unsafe(parsed.data)
    except UnsafeJson as err:
        raise TextError(err.message, parsed.position(_path_of(err.field)), err.field) from None


_PART = re.compile(r'\[(\d+)\]|\.?("(?:[^"\\]|\\.)*"|[^.\[]+)')


def _path_of(name: str) -> Path:
    """`steps[2].duration` (as `find_unsafe` names a field) back to a path."""
    if name == "body":
        return ()
    out: list[str | int] = []
    for index, key in _PART.findall(name):
        out.append(int(index) if index else json.loads(key) if key.startswith('"') else key)
    return tuple(out)


def json_error(err: ValueError) -> str:
    """What is wrong with JSON text, said once: `Expecting ',' delimiter at line 3 column 5`."""
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno} column {err.colno}"
    return str(err)


def parse_json(raw: str | bytes) -> ParsedText:
    """JSON data (strict: `models.safe_json`); its positions are composed when first asked.

    Raises:
        TextError: not JSON, or a value no route can store.
    """
    try:
        data = loads(raw)
    except ValueError as err:
        raise TextError(f"invalid JSON: {json_error(err)}") from None
    parsed = ParsedText(data, {}, raw)
    _check_safe(parsed)
    return parsed


def _json_positions(raw: str | bytes) -> dict[Path, Position]:
    """Positions of JSON text, composed as YAML flow nodes; none if the text is not also
    YAML (a tab, a raw control character): errors then name the field without a position."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        root = yaml.compose(text, Loader=_CoreSchemaLoader)
        return _data_of(root).positions if root is not None else {}
    except (yaml.YAMLError, TextError, _Alias, UnicodeDecodeError, RecursionError):
        return {}


def as_mapping(parsed: ParsedText, what: str) -> Mapping[str, Any]:
    """The data when it is a mapping (a definition always is).

    Raises:
        TextError: naming `what` it should have been.
    """
    if not isinstance(parsed.data, dict):
        raise TextError(f"{what} must be a mapping of fields (got {kind_of(parsed.data)})",
                        parsed.position(()))  # fmt: skip
    return parsed.data


def kind_of(value: Any) -> str:
    """A value's JSON kind, as a person says it (`a list`, `text`), for error messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "a mapping"
