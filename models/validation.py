"""Publish-time checks of a journey's shape: every error names the step and the field.

- at most MAX_STEPS steps;
- every step can be reached from the first one;
- every loop contains a wait (`wait` or `wait_for`), so a journey never spins;
- every path a condition, a template, a `correlate` or a wait's `until` reads exists where it is
  read: its root is available there (`profile` only in a branch, `results` only in a journey's
  own templates), and below the root only fields `models.context` declares (`customer.id` is
  refused: "did you mean customer.customer_id?"); free-form data (traits, event properties, a
  webhook's body) takes any key;
- `results.<step>` names a step that produces results and comes earlier, and a field its kind
  stores;
- templates parse, and stay within the sandbox's limits where that can be seen without data
  (`check_template_sources`, also used when a stored template is written; a send step's `ref`
  is checked against the stored template when the journey is published, in `store.journeys`).

`warnings` lists what is valid but probably not meant: after a `wait_for`, `event` is still the
entry event, not the one that came.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError, meta, nodes

from models.conditions import AllOf, AnyOf, Compare, Not
from models.context import (
    EVENT,
    GOAL_RESULT,
    PROFILE,
    PROFILE_FOR_WAIT,
    RESULT_SHAPES,
    TEMPLATE_VARIABLES,
    Shape,
    result_shape,
)
from models.template_sandbox import check_source

if TYPE_CHECKING:
    from models.journey import JourneyDefinition, Step

PRODUCES_RESULTS = set(RESULT_SHAPES)
WAITS = {"wait", "wait_for"}
# A journey is read by people; hundreds of steps is already a generated one. The cap keeps
# validation (and every run's workflow state) bounded.
MAX_STEPS = 500


def successors(defn: JourneyDefinition, step: Step) -> set[str]:
    """Where a step can go next (explicit targets, or the following step by default)."""
    from models.journey import END, BranchStep, ExitStep, _targets

    if isinstance(step, ExitStep):
        return set()
    out: set[str] = set()
    for _, target in _targets(step):
        if target is None and not isinstance(step, BranchStep):
            target = defn.following(step.id)
        if target is not None and target != END:
            out.add(target)
    return out


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components that contain a cycle (Tarjan's algorithm).

    Iterative, with an explicit stack: a recursive walk of a long chain of steps overflows
    Python's recursion limit (a 1,200-step journey was a 500)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    for root in graph:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        while work:
            node, successors_left = work[-1]
            nxt = next(successors_left, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp: list[str] = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1 or node in graph[node]:
                    out.append(comp)
    return out


# -- what a condition or template reads -----------------------------------------------

# `{{ profile.items() }}`-style calls on a record: the dict's own methods, not a field.
_DICT_METHODS = frozenset({"items", "keys", "values", "get"})


@dataclass(frozen=True)
class Scope:
    """What a condition or a template can read where it is used (`where`, for messages):
    `roots` by name, and `results(<step id>)` the shape of that step's results (raising
    ValueError when it cannot be read there); `results` None: not available at all."""

    where: str
    roots: dict[str, Shape]
    results: Callable[[str], Shape] | None = None

    @property
    def names(self) -> list[str]:
        return [*self.roots, *(["results"] if self.results is not None else [])]


# Names people reach for that the context spells differently.
_ROOT_ALIASES = {
    "user": "customer",
    "traits": "profile",
    "properties": "event.properties",
    "answer": "trigger",
    "result": "results",
}


def root_hint(name: str, available: Iterable[str]) -> str:
    """`, did you mean trigger?` for a name that is not available (empty: no good guess)."""
    names = list(available)
    alias = _ROOT_ALIASES.get(name)
    if alias is not None and alias.split(".")[0] in names:
        return f", did you mean {alias}?"
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f", did you mean {close[0]}?" if close else ""


def _suggest(label: str, part: str, shape: Shape) -> str | None:
    """The field `part` was probably meant to be, as a full path (None: no good guess)."""
    assert shape.fields is not None
    if part in shape.aliases:
        return f"{label}.{shape.aliases[part]}"
    close = difflib.get_close_matches(part, list(shape.fields), n=1, cutoff=0.7)
    if not close:  # `prop` → `properties`, `id` → `customer_id`
        low = part.lower()
        close = [f for f in shape.fields if len(low) >= 3 and f.startswith(low)]
        close = close or [f for f in shape.fields if low in f.lower().split("_")]
    if close:
        return f"{label}.{close[0]}"
    if shape.spill is not None:
        inner = shape.fields[shape.spill]
        if inner.fields is not None:  # `results.ask.score` → `results.ask.event.properties.score`
            return _suggest(f"{label}.{shape.spill}", part, inner)
        return f"{label}.{shape.spill}.{part}"
    return None


def _walk(shape: Shape, label: str, parts: list[str], *, template: bool) -> None:
    """Follow `parts` below `label` (of `shape`); raise at the first key that cannot exist.
    A template may call a value's methods (`event.event.upper()`); a condition path cannot."""
    for part in parts:
        if shape.free or (template and shape.value):
            return
        if shape.value:
            raise ValueError(f"{label}.{part}: {label} is a single value, it has no fields")
        if shape.each is not None:
            if shape.each.value:
                return  # the rest is one key: event names may contain dots
            shape, label = shape.each, f"{label}.{part}"
            continue
        assert shape.fields is not None
        if part not in shape.fields:
            if template and part in _DICT_METHODS:
                return
            if part in shape.notes:
                did = f", {shape.notes[part]}"
            else:
                hint = _suggest(label, part, shape)
                did = f", did you mean {hint}?" if hint else ""
            raise ValueError(
                f"{label}.{part}: no such field{did} ({label} has {', '.join(shape.fields)})"
            )
        shape, label = shape.fields[part], f"{label}.{part}"


def check_path(parts: list[str], scope: Scope, *, template: bool = False) -> None:
    """A path (`["customer", "id"]`) exists where `scope` reads it.

    Raises:
        ValueError: `customer.id: no such field, did you mean customer.customer_id? (...)`.
    """
    root, rest = parts[0], parts[1:]
    if root == "results" and scope.results is not None:
        if rest:
            _walk(scope.results(rest[0]), f"results.{rest[0]}", rest[1:], template=template)
        return
    shape = scope.roots.get(root)
    if shape is None:
        raise ValueError(
            f"{'.'.join(parts)}: {root} is not available in {scope.where} "
            f"(available: {', '.join(scope.names)})"
        )
    _walk(shape, root, rest, template=template)


def _compares(cond: Any) -> Iterator[Compare]:
    if isinstance(cond, Compare):
        yield cond
    elif isinstance(cond, AllOf):
        for c in cond.all:
            yield from _compares(c)
    elif isinstance(cond, AnyOf):
        for c in cond.any:
            yield from _compares(c)
    elif isinstance(cond, Not):
        yield from _compares(cond.not_)


def check_condition(cond: Any, scope: Scope) -> None:
    """Every path and `value_from` of a condition tree exists in `scope`."""
    for c in _compares(cond):
        for path in (c.path, c.value_from):
            if path is not None:
                check_path(path.split("."), scope)


def _chain(node: nodes.Node) -> list[str] | None:
    """`customer.traits["first name"].x` as `["customer", "traits", "first name", "x"]`.
    Keys computed at run time end what can be checked: only what comes before is returned."""
    parts: list[str] = []
    while True:
        if isinstance(node, nodes.Getattr):
            parts.append(node.attr)
        elif isinstance(node, nodes.Getitem):
            if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                parts.append(node.arg.value)
            else:
                parts = []  # a computed key or an index: what follows it is not checked
        elif isinstance(node, nodes.Name):
            return [node.name, *reversed(parts)]
        else:
            return None  # a call's or a filter's result: not a context path
        node = node.node


def template_paths(tree: nodes.Template) -> Iterator[list[str]]:
    """Every attribute / item chain read from a context variable (names the template assigns
    itself, with `set`, `for` or a macro's parameters, are its own)."""
    own = {n.name for n in tree.find_all(nodes.Name) if n.ctx in ("store", "param")}
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        chain = _chain(node)
        if chain is not None and chain[0] not in own and len(chain) > 1:
            yield chain


STORED_TEMPLATE = Scope(
    where="a stored template (results.<step> belongs to one journey: read it in the step's "
    "inline template)",
    roots={k: v for k, v in TEMPLATE_VARIABLES.items() if v is not None},
)


def check_template_sources(
    sources: Iterable[tuple[str, str | None]], scope: Scope = STORED_TEMPLATE
) -> None:
    """Every `(field, source)` parses, stays within the sandbox's limits where that can be
    seen without data (`models.template_sandbox.check_source`), and reads only what `scope`
    has (default: what any send has, as for a stored template), field by field.

    Raises:
        ValueError: the first problem, as `<field>: ...` (None sources are skipped).
    """
    for field, source in sources:
        if source is None:
            continue
        try:
            tree = check_source(source)
            names = meta.find_undeclared_variables(tree)
        except TemplateError as err:
            raise ValueError(f"{field}: template error: {err}") from None
        unknown = sorted(names - set(scope.names))
        if unknown:
            hint = root_hint(unknown[0], scope.names)
            raise ValueError(
                f"{field}: unknown template variable {unknown[0]!r}{hint} "
                f"(available: {', '.join(sorted(scope.names))})"
            )
        for chain in template_paths(tree):
            if chain[0] not in names:
                continue  # `loop`, a macro's `caller`: Jinja's own
            try:
                check_path(chain, scope, template=True)
            except ValueError as err:
                raise ValueError(f"{field}: {err}") from None


# -- where a journey reads -----------------------------------------------------------


def _templates(step: Step) -> list[tuple[str, str]]:
    from models.journey import HandoffStep, SendStep, WebhookStep

    if isinstance(step, HandoffStep):
        return [("title", step.title)] + [
            (f"details.{k}", v) for k, v in _strings(step.details, "")
        ]
    if isinstance(step, SendStep):
        # A `ref` has no inline content: the stored template is checked when it is written
        # and again when the journey is published.
        return [
            (f"{where}.{k}", v)
            for where, t in step.templates()
            for k, v in (("body", t.body), ("subject", t.subject), ("html", t.html))
            if v is not None
        ]
    if isinstance(step, WebhookStep):
        return [(f"payload.{k}", v) for k, v in _strings(step.payload, "")]
    return []


def _strings(value: Any, path: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(v, f"{path}.{k}".lstrip("."))]
    if isinstance(value, list):
        return [s for i, v in enumerate(value) for s in _strings(v, f"{path}[{i}]")]
    return []


class _Reads:
    """The scopes of one definition: which roots each place may read, and which steps'
    results (those that produce some and come before the reader)."""

    def __init__(self, defn: JourneyDefinition, graph: dict[str, set[str]]) -> None:
        self.defn = defn
        self.graph = graph
        self.steps = {s.id: s for s in defn.steps}
        self._after: dict[str, set[str]] = {}

    def after(self, step_id: str) -> set[str]:
        if step_id not in self._after:
            self._after[step_id] = _reachable(self.graph, step_id)
        return self._after[step_id]

    def results(self, reader: Step | None) -> Callable[[str], Shape]:
        """`results.<ref>` as `reader` sees it (None: journey-level, any step may have run)."""

        def shape_of(ref: str) -> Shape:
            step = self.steps.get(ref)
            if step is None:
                if ref == "goal" and self.defn.goal is not None:
                    return GOAL_RESULT
                raise ValueError(f"results.{ref}: no such step")
            shape = result_shape(step.kind, getattr(step, "model", None))
            if shape is None:
                raise ValueError(f"results.{ref}: a {step.kind} step produces no results")
            if reader is not None and (
                (ref == reader.id and reader.kind != "wait_for") or reader.id not in self.after(ref)
            ):
                raise ValueError(f"results.{ref}: step {ref!r} does not come before this one")
            return shape

        return shape_of

    def scopes(self, step: Step) -> list[tuple[str, Any, Scope]]:
        """(field, condition, scope) of every condition of `step`."""
        from models.journey import BranchStep, WaitForStep

        run = {"event": EVENT, "entry": EVENT, "trigger": EVENT}
        if isinstance(step, BranchStep):
            scope = Scope("a branch condition", {**run, "profile": PROFILE}, self.results(step))
            return [(f"cases[{i}].when", c.when, scope) for i, c in enumerate(step.cases)]
        if isinstance(step, WaitForStep):
            scope = Scope(
                "a wait_for condition (the profile is read by a branch step)",
                run,
                self.results(step),
            )
            return [
                (f"events[{i}].conditions", o.conditions, scope)
                for i, o in enumerate(step.events)
                if o.conditions is not None
            ]
        return []

    def template_scope(self, step: Step) -> Scope:
        roots = {k: v for k, v in TEMPLATE_VARIABLES.items() if v is not None}
        return Scope("a template", roots, self.results(step))


def _journey_reads(reads: _Reads) -> None:
    """Entry, exit_on and goal conditions: the entry sees only the event that came; exit_on
    and goal see the run's context without the profile."""
    defn = reads.defn
    at_entry = Scope("the entry's conditions (a run has nothing else yet)", {"event": EVENT})
    run = Scope(
        "an exit_on or goal condition (the profile is read by a branch step)",
        {"event": EVENT, "entry": EVENT, "trigger": EVENT},
        reads.results(None),
    )
    sites: list[tuple[str, Any, Scope]] = [("entry.conditions", defn.entry.conditions, at_entry)]
    sites += [(f"exit_on[{i}].conditions", m.conditions, run) for i, m in enumerate(defn.exit_on)]
    if defn.goal is not None:
        sites.append(("goal.conditions", defn.goal.conditions, run))
    for field, cond, scope in sites:
        if cond is not None:
            try:
                check_condition(cond, scope)
            except ValueError as err:
                raise ValueError(f"{field}: {err}") from None


def _step_reads(reads: _Reads, step: Step) -> None:
    from models.journey import WaitForStep, WaitStep

    for field, cond, scope in reads.scopes(step):
        try:
            check_condition(cond, scope)
        except ValueError as err:
            raise ValueError(f"step {step.id!r}: {field}: {err}") from None
    if isinstance(step, WaitForStep):
        on_event = Scope("a correlate path (relative to the event)", {"event": EVENT})
        for i, outcome in enumerate(step.events):
            for path in outcome.correlate:
                try:
                    check_path(["event", *path.split(".")], on_event)
                except ValueError as err:
                    raise ValueError(f"step {step.id!r}: events[{i}].correlate: {err}") from None
    if isinstance(step, WaitStep) and step.until is not None:
        at = Scope("a wait's until", {"entry": EVENT, "profile": PROFILE_FOR_WAIT})
        try:
            check_path(step.until.split("."), at)
        except ValueError as err:
            raise ValueError(f"step {step.id!r}: until: {err}") from None
    try:
        check_template_sources(_templates(step), reads.template_scope(step))
    except ValueError as err:
        raise ValueError(f"step {step.id!r}: {err}") from None


def check(defn: JourneyDefinition) -> None:
    if len(defn.steps) > MAX_STEPS:
        raise ValueError(f"steps: {len(defn.steps)} steps; limit is {MAX_STEPS}")
    graph = {s.id: successors(defn, s) for s in defn.steps}
    kinds = {s.id: s.kind for s in defn.steps}
    reachable = _reachable(graph, defn.steps[0].id)
    for s in defn.steps:
        if s.id not in reachable:
            raise ValueError(f"step {s.id!r}: can never be reached from {defn.steps[0].id!r}")
    for comp in _cycles(graph):
        if not any(kinds[n] in WAITS for n in comp):
            loop = " → ".join(n for n in defn.steps_order(comp))
            raise ValueError(f"step {comp[-1]!r}: loop {loop} has no wait or wait_for in it")
    reads = _Reads(defn, graph)
    _journey_reads(reads)
    for s in defn.steps:
        _step_reads(reads, s)


# -- warnings: valid, probably not meant ------------------------------------------------


def _event_properties(cond: Any) -> set[str]:
    """Property names a matcher's conditions read from its event (`event.properties.<x>`),
    leaving out those compared with the entry (correlated: the same in both events)."""
    out: set[str] = set()
    for c in _compares(cond):
        parts = c.path.split(".")
        if parts[:2] == ["event", "properties"] and len(parts) > 2:
            if not (c.value_from or "").startswith("entry."):
                out.add(parts[2])
    return out


def _entry_event_reads(step: Step) -> Iterator[tuple[str, str]]:
    """(field, property) for every `event.properties.<property>` a step reads where `event`
    is the entry event: branch conditions and templates."""
    from models.journey import BranchStep

    if isinstance(step, BranchStep):
        for i, case in enumerate(step.cases):
            for c in _compares(case.when):
                for path in (c.path, c.value_from):
                    parts = (path or "").split(".")
                    if parts[:2] == ["event", "properties"] and len(parts) > 2:
                        yield f"cases[{i}].when", parts[2]
    for field, source in _templates(step):
        try:
            tree = check_source(source)
        except TemplateError:
            continue
        for chain in template_paths(tree):
            if chain[:2] == ["event", "properties"] and len(chain) > 2:
                yield field, chain[2]


def warnings(defn: JourneyDefinition) -> list[str]:
    """What is valid but probably a mistake, for the validate and publish answers. Now: after
    a `wait_for`, a branch or template reads `event.properties.<x>` (the entry event) where
    `<x>` is what the awaited event's matcher looks at and the entry's does not: the answer is
    `trigger.properties.<x>` (best effort, from the matchers' property paths)."""
    from models.journey import WaitForStep

    graph = {s.id: successors(defn, s) for s in defn.steps}
    entry_props = _event_properties(defn.entry.conditions)
    if defn.run_key is not None and defn.run_key.startswith("properties."):
        entry_props.add(defn.run_key.split(".")[1])
    entry_name = defn.entry.event or defn.entry.type
    out: list[str] = []
    for wait in defn.steps:
        if not isinstance(wait, WaitForStep):
            continue
        awaited = set().union(*(_event_properties(o.conditions) for o in wait.events))
        awaited -= entry_props
        if not awaited:
            continue
        for sid in defn.steps_order(sorted(_reachable(graph, wait.id) - {wait.id})):
            for field, prop in _entry_event_reads(defn.step(sid)):
                if prop not in awaited:
                    continue
                text = (
                    f"step {sid!r}: {field} reads event.properties.{prop}, from the entry event "
                    f"({entry_name}); the event wait_for {wait.id!r} matched is "
                    f"trigger.properties.{prop} (or results.{wait.id}.event.properties.{prop})"
                )
                if text not in out:
                    out.append(text)
    return out
