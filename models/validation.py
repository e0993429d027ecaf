"""Publish-time checks of a journey's shape: every error names the step.

- at most MAX_STEPS steps;
- every step can be reached from the first one;
- every loop contains a wait (`wait` or `wait_for`), so a journey never spins;
- conditions that read `results.<step>` name a step that produces results and comes earlier;
- templates parse, and use only the variables a send provides (`check_template_sources`, also
  used when a stored template is written; a send step's `ref` is checked against the stored
  template when the journey is published, in `store.journeys`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError, meta

from models.conditions import AllOf, AnyOf, Compare, Not
from models.template_sandbox import check_source

if TYPE_CHECKING:
    from models.journey import JourneyDefinition, Step

TEMPLATE_VARIABLES = {"profile", "customer", "event", "journey"}
PRODUCES_RESULTS = {"wait_for", "score", "webhook", "split", "holdout", "send", "wait", "handoff"}
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


def _result_refs(cond: Any) -> list[str]:
    if isinstance(cond, Compare):
        parts = cond.path.split(".")
        return [parts[1]] if parts[0] == "results" and len(parts) > 1 else []
    if isinstance(cond, AllOf):
        return [r for c in cond.all for r in _result_refs(c)]
    if isinstance(cond, AnyOf):
        return [r for c in cond.any for r in _result_refs(c)]
    if isinstance(cond, Not):
        return _result_refs(cond.not_)
    return []


def _conditions(step: Step) -> list[Any]:
    from models.journey import BranchStep, WaitForStep

    if isinstance(step, BranchStep):
        return [c.when for c in step.cases]
    if isinstance(step, WaitForStep):
        return [o.conditions for o in step.events if o.conditions is not None]
    return []


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


def check_template_sources(sources: Iterable[tuple[str, str | None]]) -> None:
    """Every `(field, source)` parses, stays within the sandbox's limits where that can be
    seen without data (`models.template_sandbox.check_source`), and reads only
    TEMPLATE_VARIABLES at the top level.

    Raises:
        ValueError: the first problem, as `<field>: ...` (None sources are skipped).
    """
    for field, source in sources:
        if source is None:
            continue
        try:
            names = meta.find_undeclared_variables(check_source(source))
        except TemplateError as err:
            raise ValueError(f"{field}: template error: {err}") from None
        unknown = sorted(names - TEMPLATE_VARIABLES)
        if unknown:
            raise ValueError(
                f"{field}: unknown template variable {unknown[0]!r} "
                f"(available: {', '.join(sorted(TEMPLATE_VARIABLES))})"
            )


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
    for s in defn.steps:
        for cond in _conditions(s):
            for ref in _result_refs(cond):
                if ref not in kinds:
                    raise ValueError(f"step {s.id!r}: condition reads results.{ref}: no such step")
                if kinds[ref] not in PRODUCES_RESULTS:
                    raise ValueError(
                        f"step {s.id!r}: condition reads results.{ref}, but a "
                        f"{kinds[ref]} step produces no results"
                    )
                if (ref == s.id and s.kind != "wait_for") or s.id not in _reachable(graph, ref):
                    raise ValueError(
                        f"step {s.id!r}: condition reads results.{ref}, which does not come "
                        "before it"
                    )
        try:
            check_template_sources(_templates(s))
        except ValueError as err:
            raise ValueError(f"step {s.id!r}: {err}") from None
