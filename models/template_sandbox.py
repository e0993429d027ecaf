"""The one Jinja environment message templates run in: sandboxed and bounded.

Templates are written by people who use the API, and the data they read (traits, event
properties) comes from anyone who can send events; neither may freeze or exhaust the process
that renders (the worker at send time, the API for previews). Jinja's
`ImmutableSandboxedEnvironment` already refuses `''.__class__.__mro__` and other attribute
escapes, and the methods that change a list, dict or set in place (`append`, `extend`,
`update`, `pop`...: their `None` result hid a list doubling itself); on top of it:

- no globals: `range`, `dict`, `lipsum`, `cycler`, `joiner` and `namespace` are not defined
  (they rendered Python reprs, or let a template build huge work), `self` and
  `extends` / `include` / `import` are refused when the template is parsed;
- no bytes (`str.encode` is not available: bytes methods are not checked) and no `str.format`
  (its widths are unbounded; the `format` filter does the same job, checked);
- every value is measured by what it renders to, not by its length: `[s] * 1000` is a list of
  1000 references to one string but renders 1000 times `s`. `_rendered_size` walks a value
  (at most until it is past the limit, checking the clock) and is asked before anything
  stringifies or multiplies a container: `{{ x }}`, `~`, `*`, `%`, every filter that turns its
  input into text or drains it, list / dict / tuple literals, and every call's result;
- `**`, `*`, `+`, `%` and `~` are checked before (or, where the growth is bounded, right after)
  they compute: an integer stays below MAX_INT_BITS, a string or container below
  MAX_RENDER_CHARS. `%` and the `format` filter check every width and precision (`%5s`,
  `%(key)5s`, `%*s` with its argument) and the size of what they format. Intercepted operators
  are never folded at compile time, so compiling `{{ 7 ** 23059204 }}` is instant;
- filters and methods whose result can outgrow their input by an unbounded factor (`center`,
  `indent`, `join`, `replace`, `format`, `wordwrap`, `batch`, `slice`; `str.join`,
  `str.replace`, `str.translate`, `str.center`...) are checked before they run, every other
  filter and call right after. Filters that drain an iterable (`list`, `join`, `map`, `sort`,
  `unique`, `sum`...) refuse input that renders past the limit and spend one step per item
  drawn from a generator (`map`, `select`, `batch`...);
  `batch` and `slice` refuse more than MAX_STEPS rows or columns up front;
- one render may run at most MAX_STEPS loop iterations, drained items and calls, for at most
  MAX_SECONDS, and produce at most MAX_RENDER_CHARS characters (also inside a macro,
  `{% set %}` block, `{% filter %}` block or `caller()`, whose output is joined in one piece).

So what one render holds at a time is a small multiple of MAX_RENDER_CHARS (a result may
reach a few times the limit before the check right after it refuses it), and each operation
between two clock checks works on values of that size.

Callers render off the event loop (activities.rendering.off_loop): a render may use its whole
CPU budget, and the loop must keep serving other activities, heartbeats and requests.

Not built: a render in a subprocess with RLIMIT_AS and a kill timeout. It would bound what
the checks above might miss, but costs a process start or a pool of renderer processes per
worker and API (forking a process that runs the Temporal core's threads is unsafe; spawning
re-imports Jinja per process), a pickling round trip of the context per send, and its own
failure modes (a killed renderer mid-send, pool sizing). The checks above bound memory and
time by construction for every operation a template can reach (no globals, no mutation, no
bytes, every container measured), which is the failure the subprocess would catch; revisit
if templates ever get custom filters or globals that can allocate.

Every refusal is a `jinja2.TemplateError` (SecurityError or TemplateSyntaxError), so a send
that renders such a template fails for good and is recorded, and publish refuses what can be
seen without data (`check_source`).

Pure (no I/O): imported by models.validation at publish and by activities.rendering.
"""

from __future__ import annotations

import contextvars
import functools
import operator
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.runtime import Context, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

__all__ = [
    "MAX_INT_BITS",
    "MAX_RENDER_CHARS",
    "MAX_SECONDS",
    "MAX_STEPS",
    "BoundedEnvironment",
    "SecurityError",
    "check_source",
]

# A rendered part (subject, body, html) or any string / list built on the way. Emails past
# ~100 KB are clipped by mail clients; 512 K characters leaves room and stays cheap.
MAX_RENDER_CHARS = 512_000
# Integers: 4096 bits (~1233 decimal digits) is far above any price, count or id.
MAX_INT_BITS = 4096
# Loop iterations, items drained by filters, and calls (macros, methods, filters) in one render.
MAX_STEPS = 100_000
# Wall-clock time of one render, checked every few steps and while measuring a value.
MAX_SECONDS = 2.0

_REFUSED_TAGS = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)
# One printf conversion: %[(key)][flags][width][.precision][length]type
_PRINTF = re.compile(
    r"%(?:\((?P<key>[^)]*)\))?[-#0 +]*(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d*))?[hlL]?(?P<conv>.?)",
    re.DOTALL,
)
_BYTES = (bytes, bytearray, memoryview)
# Filters that iterate over their whole input (or over the items of their output).
_DRAINING = frozenset(
    {
        "batch", "dictsort", "groupby", "items", "join", "last", "list", "map", "max", "min",
        "reject", "rejectattr", "reverse", "select", "selectattr", "slice", "sort", "sum",
        "unique",
    }
)  # fmt: skip
# Filters that neither stringify nor drain their arguments: not measured before they run.
_NOT_MEASURED = frozenset({"attr", "count", "d", "default", "first", "length", "random"})
# Python reprs: the digits of an int are ~0.302 per bit; a float repr is at most 24 chars.
_FLOAT_CHARS = 24
_OTHER_CHARS = 64  # a macro, loop or generator renders as a short `<... object>` text


class _Budget:
    """What one render may still spend (steps, until when)."""

    __slots__ = ("deadline", "steps")

    def __init__(self) -> None:
        self.steps = MAX_STEPS
        self.deadline = time.monotonic() + MAX_SECONDS

    def spend(self, steps: int = 1) -> None:
        self.steps -= steps
        if self.steps < 0:
            raise SecurityError(f"template exceeds {MAX_STEPS} loop iterations and calls")
        self.check_time()  # ~60 ns; one step may sort or measure a list of the largest size

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise SecurityError(f"template takes longer than {MAX_SECONDS:g} s to render")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "template_budget", default=None
)


def _spend(steps: int = 1) -> None:
    budget = _budget.get()
    if budget is not None:
        budget.spend(steps)


def _rendered_size(value: Any, limit: int = MAX_RENDER_CHARS, *, indent: bool = False) -> int:
    """About how many characters `str(value)` (or its repr, or its JSON) would have: exact
    for plain strings, within a small factor for containers (escapes, separators). Counting
    stops as soon as it is past `limit`, so the walk is bounded by the limit, not by how many
    times a container repeats a reference; the clock is checked as it goes.

    Args:
        indent: count one character of indentation per nesting level (what `pprint` adds).

    Raises:
        SecurityError: for bytes (never available in templates) or when time is up.
    """
    budget = _budget.get()
    total = 0
    visited = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        visited += 1
        if budget is not None and not visited % 4096:
            budget.check_time()
        if isinstance(item, str):
            total += len(item) + (2 if depth else 0)  # a string inside a container: quoted
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() * 31 // 100 + 2
        elif isinstance(item, float):
            total += _FLOAT_CHARS
        elif isinstance(item, dict | list | tuple | set | frozenset) or (
            # the ABCs are slow to ask: only for what is not a builtin container
            isinstance(item, Mapping | Collection) and not isinstance(item, _BYTES | Undefined)
        ):
            # Every entry is at least one character plus a separator: a container longer
            # than the limit is past it without looking at its items.
            entries = len(item)
            total += 2 + 3 * entries + (depth * entries if indent else 0)
            if total > limit:
                return total
            if isinstance(item, dict | Mapping):
                for key, val in item.items():
                    stack.append((key, depth + 1))
                    stack.append((val, depth + 1))
            else:
                stack.extend([(v, depth + 1) for v in item])
        elif isinstance(item, _BYTES):
            raise SecurityError("bytes are not available in message templates")
        else:
            total += _OTHER_CHARS
        if total > limit:
            return total
    return total


def _refuse_if_large(value: Any, what: str, *, indent: bool = False) -> None:
    if isinstance(value, str):
        size = len(value)
    elif isinstance(value, int | float | Undefined) or value is None:
        return
    else:
        size = _rendered_size(value, indent=indent)
    if size > MAX_RENDER_CHARS:
        raise SecurityError(f"{what} would be longer than {MAX_RENDER_CHARS} characters")


def _bounded(value: Any, what: str) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise SecurityError(f"{what} would be an integer above {MAX_INT_BITS} bits")
    _refuse_if_large(value, what)
    return value


def _drained(value: Any, what: str) -> Any:
    """`value` as a filter that iterates it all will see it: one step per item, refused if
    its items render past the limit. An iterator (`map`, `select`, `batch`...) is drained
    into a list here, one step per item (its items are made by Python code, one by one),
    measuring each item before the next is produced. A list or dict already made is only
    measured: the filter goes over it in C, bounded by its size, and the clock is checked
    at the filter's step."""
    if isinstance(value, str | Undefined) or value is None:
        return value
    if isinstance(value, Collection | Mapping):
        _refuse_if_large(value, what)
        return value
    if not isinstance(value, Iterable):
        return value
    items: list[Any] = []
    total = 2
    for item in value:
        _spend()
        total += _rendered_size(item) + 2
        if total > MAX_RENDER_CHARS:
            raise SecurityError(f"{what} would be longer than {MAX_RENDER_CHARS} characters")
        items.append(item)
    return items


def _check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse before computing what would be too big (only the unbounded growths)."""
    if op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        if abs(left) > 1 and right * max(abs(left).bit_length() - 1, 1) > MAX_INT_BITS:
            raise SecurityError(f"{left} ** {right} is too large")
    elif op == "*":
        for seq, times in ((left, right), (right, left)):
            if (
                isinstance(seq, str | list | tuple)
                and seq
                and isinstance(times, int)
                and times > 0
                and _rendered_size(seq, MAX_RENDER_CHARS // times + 1) * times > MAX_RENDER_CHARS
            ):
                raise SecurityError(
                    f"repeating {type(seq).__name__} {times} times would be longer than "
                    f"{MAX_RENDER_CHARS} characters"
                )
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                raise SecurityError(f"product above {MAX_INT_BITS} bits")
    elif op == "%" and isinstance(left, str):
        _check_printf(left, right)


def _check_printf(fmt: str, args: Any) -> None:
    """`fmt % args` would stay within the limit: every width and precision, including the
    `%(key)N` form and `*` (whose value is the next argument), and what each conversion
    formats (its rendered size) are added up before anything is formatted."""
    positional = list(args) if isinstance(args, tuple) else [args]
    mapping = args if isinstance(args, Mapping) else None
    total = len(fmt)
    for m in _PRINTF.finditer(fmt):
        if m["conv"] == "%":
            continue
        sizes: list[int] = []
        for part in (m["width"], m["prec"]):
            if part == "*":
                given = positional.pop(0) if positional else 0
                sizes.append(abs(given) if isinstance(given, int) else 0)
            elif part:
                sizes.append(int(part))
        if m["key"] is not None:
            arg = mapping.get(m["key"]) if mapping is not None else None
        else:
            arg = positional.pop(0) if positional else None
        if any(size > MAX_RENDER_CHARS for size in sizes):
            raise SecurityError(f"format width {max(sizes)} is not allowed")
        total += max([*sizes, _rendered_size(arg)])
        if total > MAX_RENDER_CHARS:
            raise SecurityError(f"formatting would be longer than {MAX_RENDER_CHARS} characters")


def _check_filter(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Arguments of the filters that can grow their input by an unbounded factor."""
    value = args[0] if args else None
    rest = list(args[1:]) + list(kwargs.values())
    if name == "center":
        width = rest[0] if rest else 80
        if isinstance(width, int) and width > MAX_RENDER_CHARS:
            raise SecurityError(f"center width {width} is too large")
    elif name == "indent":
        lines = str(value).count("\n") + 1
        for width in rest:
            grow = width if isinstance(width, int) else _rendered_size(width)
            if lines * grow > MAX_RENDER_CHARS:
                raise SecurityError("indent would be too large")
    elif name == "join" and isinstance(value, Collection):
        # The items' text (measured as a whole by `_drained`) plus the separators.
        sep = args[1] if len(args) > 1 else kwargs.get("d", "")
        if len(value) * _rendered_size(sep) > MAX_RENDER_CHARS:
            raise SecurityError("join would be too large")
    elif name == "replace":
        _check_replace(_rendered_size(value), rest)
    elif name == "format" and isinstance(value, str):
        _check_printf(value, kwargs or tuple(args[1:]))
    elif name == "wordwrap" and len(rest) > 2:
        if _rendered_size(rest[2]) * _rendered_size(value) > MAX_RENDER_CHARS:
            raise SecurityError("wordwrap would be too large")
    elif name == "batch" and rest and isinstance(rest[0], int) and rest[0] > MAX_STEPS:
        raise SecurityError(f"batch of {rest[0]} items is too large")
    elif name == "slice" and rest and isinstance(rest[0], int) and rest[0] > MAX_STEPS:
        raise SecurityError(f"slice into {rest[0]} columns is too large")


def _check_replace(length: int, args: list[Any]) -> None:
    if len(args) >= 2:
        old, new = _rendered_size(args[0]), _rendered_size(args[1])
        if (length + 1) * max(new - old, 0) > MAX_RENDER_CHARS:
            raise SecurityError("replace would be too large")


def _metered(rows: Iterable[Any]) -> Iterator[Any]:
    """`batch` / `slice` rows, one step each (the rows are built lazily by Jinja)."""
    for row in rows:
        _spend(len(row) if isinstance(row, Collection) else 1)
        yield row


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_context marks
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _spend()
        # pass_* filters get the context / eval context / environment first.
        passed = 1 if getattr(f, "jinja_pass_arg", None) else 0
        plain = args[passed:]
        if name in _DRAINING and plain:
            plain = (_drained(plain[0], f"the {name} filter's input"), *plain[1:])
        if name not in _NOT_MEASURED:
            for arg in (*plain, *kwargs.values()):
                _refuse_if_large(arg, f"an argument of the {name} filter", indent=name == "pprint")
        _check_filter(name, plain, kwargs)
        result = f(*args[:passed], *plain, **kwargs)
        if name in ("batch", "slice"):
            result = _metered(result)
        return _bounded(result, f"the {name} filter's result")

    return wrapper


class _BoundedCodeGenerator(CodeGenerator):
    """Hooks the runtime has no extension point for: `a ~ b` is measured before its parts are
    stringified and after they are joined; list, tuple and dict literals are measured by what
    they would render to (`[l, l, l]` of a large `l`)."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"environment.bounded_concat({func_name}(environment.concat_parts((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))))")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self.write("environment.bounded_literal(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("environment.bounded_literal(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx != "load":  # `{% for a, b in ... %}`, `{% set a, b = ... %}`
            super().visit_Tuple(node, frame)
            return
        self.write("environment.bounded_literal(")
        super().visit_Tuple(node, frame)
        self.write(")")


def _finalize(value: Any) -> Any:
    """Every `{{ ... }}` goes through here before it is turned into text."""
    _refuse_if_large(value, "the value of an expression")
    return value


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with the limits in the module docstring."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"**", "*", "+", "%"})

    def __init__(self, *, autoescape: bool = False) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=autoescape, finalize=_finalize)
        self.globals.clear()
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # str.format has its own sandboxed formatter, but its widths are unbounded; the
        # `format` filter (printf style, checked) does the same job. Bytes methods are not
        # checked at all, so bytes are never made.
        if isinstance(obj, str) and attr in ("format", "format_map", "encode"):
            return False
        if isinstance(obj, _BYTES):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> None:
        """Jinja hands out a sandboxed `str.format` before asking `is_safe_attribute`; here
        the attribute is refused instead (see is_safe_attribute)."""
        return None

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _spend()
        _check_binop(operator, left, right)
        return _bounded(super().call_binop(context, operator, left, right), f"{operator!r}")

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _spend()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(owner, getattr(__obj, "__name__", ""), args)
        return _bounded(
            ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs),
            "a call",
        )

    def bounded_concat(self, value: Any) -> Any:
        return _bounded(value, "'~'")

    def concat_parts(self, parts: tuple[Any, ...]) -> tuple[Any, ...]:
        """The parts of `a ~ b ~ ...`, measured before they are stringified."""
        if sum(_rendered_size(part) for part in parts) > MAX_RENDER_CHARS:
            raise SecurityError(f"'~' would be longer than {MAX_RENDER_CHARS} characters")
        return parts

    def bounded_literal(self, value: Any) -> Any:
        return _bounded(value, "a literal")

    def concat(self, chunks: Iterable[str]) -> str:  # type: ignore[override]
        """Joins the output of a macro, a `{% set %}` or `{% filter %}` block or `caller()`
        (the generated code calls `environment.concat`): measured before it is joined."""
        parts = list(chunks)
        if sum(len(part) for part in parts) > MAX_RENDER_CHARS:
            raise SecurityError(
                f"a block's output would be longer than {MAX_RENDER_CHARS} characters"
            )
        return "".join(parts)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for node in tree.find_all(_REFUSED_TAGS):
            raise TemplateSyntaxError(
                f"{type(node).__name__.lower()} is not available in message templates",
                node.lineno,
                name,
                filename,
            )
        for ref in tree.find_all(nodes.Name):
            if ref.name == "self":
                raise TemplateSyntaxError(
                    "'self' is not available in message templates", ref.lineno, name, filename
                )
        for loop in tree.find_all(nodes.For):
            # Every loop counts against the render's step budget.
            loop.iter = nodes.Call(
                nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [], None, None
            ).set_lineno(loop.lineno)
        return tree

    def bounded_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            _spend()
            yield item

    def render_bounded(self, template: Any, context: dict[str, Any]) -> str:
        """Render within the budget and the size limit (what activities.rendering calls)."""
        token = _budget.set(_Budget())
        try:
            out: list[str] = []
            total = 0
            for chunk in template.generate(**context):
                total += len(chunk)
                if total > MAX_RENDER_CHARS:
                    raise SecurityError(
                        f"rendered text would be longer than {MAX_RENDER_CHARS} characters"
                    )
                out.append(chunk)
            return "".join(out)
        finally:
            _budget.reset(token)


def _check_str_method(owner: str, name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The str methods whose result can outgrow the string by an unbounded factor, checked
    before they run. Returns the arguments to call with (an iterable given to `join`,
    drained once here)."""
    if name in ("center", "ljust", "rjust", "zfill", "expandtabs"):
        width = args[0] if args else 8
        if (
            isinstance(width, int)
            and width * (len(owner) if name == "expandtabs" else 1) > MAX_RENDER_CHARS
        ):
            raise SecurityError(f"str.{name}({width}) is too large")
    elif name == "replace":
        _check_replace(len(owner), list(args))
    elif name == "join" and args:
        items = _drained(args[0], "str.join's input")
        items = list(items) if isinstance(items, Iterable) else items
        if isinstance(items, list):
            if len(owner) * len(items) + _rendered_size(items) > MAX_RENDER_CHARS:
                raise SecurityError("str.join would be too large")
        args = (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], Mapping):
        table = args[0]
        _spend(len(table))
        longest = max((len(v) if isinstance(v, str) else 1 for v in table.values()), default=1)
        if len(owner) * longest > MAX_RENDER_CHARS:
            raise SecurityError("str.translate would be too large")
    return args


_checker = BoundedEnvironment()


def check_source(source: str) -> nodes.Template:
    """Parse `source` as a message template and refuse, without data, what can never render:
    syntax errors, `self`, includes, and constant expressions over the limits
    (`{{ 7 ** 23059204 }}`, `{{ 'a' * 10**9 }}`).

    Returns:
        The parsed template (for the caller's variable checks).

    Raises:
        TemplateSyntaxError | SecurityError: both are jinja2.TemplateError.
    """
    tree = _checker.parse(source)
    for node in tree.find_all(nodes.BinExpr):
        try:
            _const(node)
        except nodes.Impossible:
            continue
        except SecurityError as err:
            raise SecurityError(f"line {node.lineno}: {err}") from None
    return tree


def _const(node: nodes.Expr) -> Any:
    """The value of a constant expression, computed with the sandbox's checks (Jinja's own
    `as_const` gives up on intercepted operators). Raises nodes.Impossible if not constant."""
    if isinstance(node, nodes.BinExpr):
        left, right = _const(node.left), _const(node.right)
        _check_binop(node.operator, left, right)
        try:
            return _bounded(_BINOPS[node.operator](left, right), repr(node.operator))
        except (ArithmeticError, TypeError, ValueError):
            raise nodes.Impossible() from None  # fails at render, with its own message
    return node.as_const()


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "**": operator.pow,
    "%": operator.mod,
}
