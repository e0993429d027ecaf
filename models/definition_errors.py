"""Validation errors said the way a journey or template author reads them.

pydantic's errors carry its own vocabulary: union branches in the location
(`channel.literal['best']`), one error per branch of a union (a typo in `channel` was three
errors), `Value error, ...` prefixes, "Field required" for a key that is misspelt rather than
missing. `explain` turns them into `Problem`s: the field as a path into what was written
(`steps[2].duration`), the step's id, the line and column when the definition came as text, and
one message per mistake: "unknown field `chanel` (did you mean `channel`?)", "must be one of:
outbox, email, ... (got 'emial'; did you mean 'email'?)". `problem_of` does the same for the
messages of our own checks (`models.validation`, stored template references), which start with
`step 'x':` or a field name. Every route that validates a definition, `load_file` and the
devstack use these two, so a mistake reads the same everywhere.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from models.definition_text import ParsedText, Path, Position, kind_of, located

_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'")
_FIELD = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*): (.+)$", re.S)
_STEP = re.compile(r"^step '([^']*)': (.+)$", re.S)
_PATH_PART = re.compile(r"\[(\d+)\]|\.?([^.\[]+)")


@dataclass(frozen=True)
class Problem:
    """One mistake: where (`field`, a path like `steps[2].duration`; "" for the whole
    definition), which step, at which line and column of the text, and what is wrong."""

    field: str
    message: str
    step: str | None = None
    position: Position | None = None

    def __str__(self) -> str:
        about = [f"step {self.step!r}"] if self.step else []
        return located(self.field, self.message, self.position, *about)


def field_name(path: Path) -> str:
    """("steps", 2, "duration") -> `steps[2].duration`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _parsed(source: ParsedText | Mapping[str, Any]) -> ParsedText:
    return source if isinstance(source, ParsedText) else ParsedText(source, {})


def _problem(parsed: ParsedText, path: Path, message: str, at: Path | None = None) -> Problem:
    step = None
    data = parsed.data
    if len(path) >= 2 and path[0] == "steps" and isinstance(path[1], int):
        steps = data.get("steps") if isinstance(data, dict) else None
        raw = steps[path[1]] if isinstance(steps, list) and path[1] < len(steps) else None
        sid = raw.get("id") if isinstance(raw, dict) else None
        step = sid if isinstance(sid, str) and sid else None
    return Problem(field_name(path), message, step, parsed.position(path if at is None else at))


def _path_of(text: str) -> Path:
    return tuple(int(i) if i else k for i, k in _PATH_PART.findall(text))


def problem_of(message: str, source: ParsedText | Mapping[str, Any], at: Path = ()) -> Problem:
    """A message of our own checks (`step 'x': template.body: ...`, `steps: ...`) as a Problem
    at the step and field it names, relative to `at`."""
    parsed = _parsed(source)
    path = at
    if not at and (m := _STEP.match(message)):
        steps = parsed.data.get("steps") if isinstance(parsed.data, dict) else None
        ids = [s.get("id") if isinstance(s, dict) else None for s in steps or []]
        if m.group(1) in ids:
            path, message = ("steps", ids.index(m.group(1))), m.group(2)
    if m := _FIELD.match(message):
        sub = _path_of(m.group(1))
        if _has(parsed.data, path + sub[:1]):
            path, message = path + sub, m.group(2)
    return _problem(parsed, path, message)


def _has(data: Any, path: Path) -> bool:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return False
    return True


@dataclass
class _Error:
    """A pydantic error with its location split: the path into the data, and the union
    branches taken on the way (`sites`: where -> which branch)."""

    path: Path
    sites: dict[tuple[Path, int], str]
    error: dict[str, Any]


def _split(data: Any, loc: tuple[Any, ...], kind: str) -> _Error:
    path: list[str | int] = []
    sites: dict[tuple[Path, int], str] = {}
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif last and kind == "missing":
            path.append(part)
        elif part == "[key]":
            continue  # the key itself is wrong: the path already ends at it
        else:  # a union branch pydantic tried (a discriminator tag, `literal['best']`)
            n = sum(1 for where, _ in sites if where == tuple(path))
            sites[(tuple(path), n)] = str(part)
    return _Error(tuple(path), sites, {})


def _is_type_error(err: dict[str, Any]) -> bool:
    return str(err["type"]).endswith("_type")


def _best_branches(group: list[_Error], site: tuple[Path, int]) -> set[str]:
    """The branch(es) of a union that fit best: the one the input got furthest into; then one
    whose errors are not just "wrong type"; several only if all are `literal_error`s at the
    same field (their choices are merged into one message)."""
    depth: dict[str, int] = {}
    for e in group:
        tag = e.sites[site]
        depth[tag] = max(depth.get(tag, 0), len(e.path))
    top = max(depth.values())
    tags = [t for t in depth if depth[t] == top]
    by_tag = {t: [e for e in group if e.sites[site] == t] for t in tags}
    typed = [t for t in tags if not all(_is_type_error(e.error) for e in by_tag[t])]
    tags = typed or tags
    literal = all(e.error["type"] == "literal_error" for t in tags for e in by_tag[t])
    if literal and len({e.path for t in tags for e in by_tag[t]}) == 1:
        return set(tags)
    return {tags[0]}


def _one_branch_per_union(errors: list[_Error]) -> list[_Error]:
    sites = sorted({s for e in errors for s in e.sites}, key=lambda s: (len(s[0]), s[1]))
    for site in sites:
        group = [e for e in errors if site in e.sites]
        if len({e.sites[site] for e in group}) < 2:
            continue
        keep = _best_branches(group, site)
        errors = [e for e in errors if site not in e.sites or e.sites[site] in keep]
    return errors


def _choices(expected: str) -> list[str]:
    return [m.replace("\\'", "'") for m in _QUOTED.findall(expected)]


def _did_you_mean(given: Any, choices: list[str], quote: str = "'") -> str:
    if not isinstance(given, str):
        return ""
    close = difflib.get_close_matches(given, choices, n=1, cutoff=0.6)
    return f"did you mean {quote}{close[0]}{quote}?" if close else ""


def _got(value: Any) -> str:
    if not isinstance(value, str | int | float | bool):
        return ""
    shown = repr(value)
    return f"got {shown[:60]}…" if len(shown) > 60 else f"got {shown}"


def _one_of(choices: list[str], given: Any) -> str:
    notes = "; ".join(x for x in (_got(given), _did_you_mean(given, choices)) if x)
    return f"must be one of: {', '.join(choices)}" + (f" ({notes})" if notes else "")


def _unwrap(t: Any) -> Any:
    while get_origin(t) is Annotated:
        t = get_args(t)[0]
    if get_origin(t) in (Union, types.UnionType):
        members = [m for m in get_args(t) if m is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return t


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _into(t: Any, part: Any) -> Any:
    """The type found one step into `t` along a pydantic location part (None: unknown)."""
    t = _unwrap(t)
    origin = get_origin(t)
    if _is_model(t):
        for name, info in t.model_fields.items():
            if part in (name, info.alias):
                return info.annotation
        return None
    if origin in (list, tuple, set, frozenset) and isinstance(part, int):
        return get_args(t)[0]
    if origin is dict:
        return get_args(t)[1]
    if origin in (Union, types.UnionType):
        for member in map(_unwrap, get_args(t)):
            if not _is_model(member):
                continue
            kind = member.model_fields.get("kind")
            if member.__name__ == part or (
                kind is not None and get_origin(kind.annotation) is Literal
                and part in get_args(kind.annotation)
            ):  # fmt: skip
                return member
    return None


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names (aliases) of the model at `loc`, for "did you mean"; [] if unknown."""
    t: Any = model
    for part in loc:
        t = _into(t, part)
        if t is None:
            return []
    t = _unwrap(t)
    return [info.alias or name for name, info in t.model_fields.items()] if _is_model(t) else []


def _at(data: Any, path: Path) -> Any:
    for part in path:
        data = data[part] if _has(data, (part,)) else None
    return data


def _say(e: _Error, model: type[BaseModel] | None, data: Any) -> tuple[Path, str]:
    """The error's field and message, in the author's words."""
    err = e.error
    kind, ctx, given = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        name = str(e.path[-1])
        around = _at(data, e.path[:-1])
        typo = (
            difflib.get_close_matches(name, list(around), n=1) if isinstance(around, dict) else []
        )
        hint = f" (`{typo[0]}` is not a field: did you mean `{name}`?)" if typo else ""
        return e.path[:-1], f"missing required field `{name}`{hint}"
    if kind == "extra_forbidden":
        known = _fields_at(model, tuple(err["loc"][:-1])) if model else []
        hint = _did_you_mean(str(e.path[-1]), known, "`")
        return e.path[:-1], f"unknown field `{e.path[-1]}`" + (f" ({hint})" if hint else "")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        name = ctx.get("discriminator", "kind").strip("'")
        choices = _choices(str(ctx.get("expected_tags", "")))
        if kind == "union_tag_not_found":
            return e.path, f"missing required field `{name}`" + (
                f" (one of: {', '.join(choices)})" if choices else ""
            )
        return (*e.path, name), _one_of(choices, ctx.get("tag"))
    if kind in ("value_error", "assertion_error"):
        return e.path, str(ctx.get("error", err["msg"]))
    message = _PLAIN.get(kind) or str(err["msg"]).replace("Input should be", "must be")
    message = message[:1].lower() + message[1:]
    return e.path, f"{message} ({_got(given) or 'got ' + kind_of(given)})"


# pydantic's "Input should be a valid dictionary or object to extract fields from", said plainly.
_PLAIN = {
    "model_type": "must be a mapping of fields",
    "model_attributes_type": "must be a mapping of fields",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "string_type": "must be text",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
}


def _misspelt(e: _Error, errors: list[_Error]) -> bool:
    """A missing field whose misspelling is given beside it (and refused as unknown)."""
    if e.error["type"] != "missing":
        return False
    unknown = [
        str(x.path[-1]) for x in errors
        if x.error["type"] == "extra_forbidden" and x.path[:-1] == e.path[:-1]
    ]  # fmt: skip
    return bool(difflib.get_close_matches(str(e.path[-1]), unknown, n=1))


def explain(
    err: ValidationError | Sequence[Mapping[str, Any]],
    source: ParsedText | Mapping[str, Any],
    model: type[BaseModel] | None = None,
    *,
    prefix: Path = (),
) -> list[Problem]:
    """`err` (from validating `source`'s data as `model`; or its `errors()`) as Problems, one
    per mistake, in the order they were found; positions when `source` is parsed text.
    `prefix`: where in `source` the validated value is (its errors' locations start there)."""
    parsed = _parsed(source)
    raw = err.errors(include_url=False) if isinstance(err, ValidationError) else list(err)
    raw = [{**e, "loc": (*prefix, *e["loc"])} for e in raw] if prefix else raw
    errors = [_split(parsed.data, tuple(e["loc"]), e["type"]) for e in raw]
    for split, e in zip(errors, raw, strict=True):
        split.error = e
    errors = _one_branch_per_union(errors)
    # The choices of every union branch left at a field, said once.
    choices: dict[Path, list[str]] = {}
    for e in errors:
        if e.error["type"] == "literal_error":
            known = choices.setdefault(e.path, [])
            known += [c for c in _choices(str(e.error["ctx"]["expected"])) if c not in known]
    out: list[Problem] = []
    for e in errors:
        if e.error["type"] == "literal_error":
            if e.path not in choices:
                continue  # said already
            out.append(_problem(parsed, e.path, _one_of(choices.pop(e.path), e.error["input"])))
            continue
        if _misspelt(e, errors):
            continue  # said by the "unknown field ... did you mean" of the misspelling
        path, message = _say(e, model, parsed.data)
        if e.error["type"] in ("value_error", "assertion_error"):
            out.append(problem_of(message, parsed, path))
        else:  # an unknown field is pointed at where it was written
            at = e.path if e.error["type"] == "extra_forbidden" else path
            out.append(_problem(parsed, path, message, at))
    seen: set[str] = set()
    return [p for p in out if not (str(p) in seen or seen.add(str(p)))]
