"""The one Jinja environment message templates run in: sandboxed and bounded.

Templates are written by people who use the API, and the data they read (traits, event
properties) comes from anyone who can send events; neither may freeze or exhaust the process
that renders (the worker at send time, the API for previews). Jinja's `SandboxedEnvironment`
already refuses `''.__class__.__mro__` and other attribute escapes; on top of it:

- no globals: `range`, `dict`, `lipsum`, `cycler`, `joiner` and `namespace` are not defined
  (they rendered Python reprs, or let a template build huge work), `self` and
  `extends` / `include` / `import` are refused when the template is parsed;
- `**`, `*`, `+`, `%` and `~` are checked before (or, where the growth is bounded, right after)
  they compute: an integer stays below MAX_INT_BITS, a string or list below MAX_RENDER_CHARS.
  Intercepted operators are also never folded at compile time, so compiling
  `{{ 7 ** 23059204 }}` is instant (it fails when rendered, and at publish);
- filters and methods whose result can outgrow their input by an unbounded factor (`center`,
  `indent`, `join`, `replace`, `format`, `wordwrap`; `str.join` / `str.replace`) are checked
  before they run, every other filter and call right after;
- one render may run at most MAX_STEPS loop iterations and calls, for at most MAX_SECONDS,
  and produce at most MAX_RENDER_CHARS characters.

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
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment, SecurityError

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
# Loop iterations plus calls (macros, methods, filters) in one render.
MAX_STEPS = 100_000
# Wall-clock time of one render, checked at every step.
MAX_SECONDS = 2.0

_REFUSED_TAGS = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)
_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class _Budget:
    """What one render may still spend (steps, until when)."""

    __slots__ = ("deadline", "steps")

    def __init__(self) -> None:
        self.steps = MAX_STEPS
        self.deadline = time.monotonic() + MAX_SECONDS

    def spend(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise SecurityError(f"template exceeds {MAX_STEPS} loop iterations and calls")
        if not self.steps % 256 and time.monotonic() > self.deadline:
            raise SecurityError(f"template takes longer than {MAX_SECONDS:g} s to render")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "template_budget", default=None
)


def _spend() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.spend()


def _size(value: Any) -> int:
    if isinstance(value, str | list | tuple | bytes):
        return len(value)
    return 0


def _bounded(value: Any, what: str) -> Any:
    if _size(value) > MAX_RENDER_CHARS:
        raise SecurityError(f"{what} would be longer than {MAX_RENDER_CHARS} characters")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise SecurityError(f"{what} would be an integer above {MAX_INT_BITS} bits")
    return value


def _check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse before computing what would be too big (only the unbounded growths)."""
    if op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        if abs(left) > 1 and right * max(abs(left).bit_length() - 1, 1) > MAX_INT_BITS:
            raise SecurityError(f"{left} ** {right} is too large")
    elif op == "*":
        for seq, times in ((left, right), (right, left)):
            if _size(seq) and isinstance(times, int) and _size(seq) * times > MAX_RENDER_CHARS:
                raise SecurityError(
                    f"repeating {type(seq).__name__} {times} times would be longer than "
                    f"{MAX_RENDER_CHARS} characters"
                )
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                raise SecurityError(f"product above {MAX_INT_BITS} bits")
    elif op == "%" and isinstance(left, str):
        _check_printf(left)


def _check_printf(fmt: str) -> None:
    for m in _FORMAT_WIDTH.finditer(fmt):
        for width in m.groups():
            if width == "*" or (width and int(width) > MAX_RENDER_CHARS):
                raise SecurityError(f"format width {width} is not allowed")


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
            grow = width if isinstance(width, int) else _size(width)
            if lines * grow > MAX_RENDER_CHARS:
                raise SecurityError("indent would be too large")
    elif name == "join" and value is not None:
        items = _size(value) if isinstance(value, str | list | tuple) else 0
        if rest and items * _size(rest[0]) > MAX_RENDER_CHARS:
            raise SecurityError("join would be too large")
    elif name == "replace":
        _check_replace(_size(value), rest)
    elif name == "format" and isinstance(value, str):
        _check_printf(value)
    elif name == "wordwrap" and len(rest) > 2 and _size(rest[2]) * _size(value) > MAX_RENDER_CHARS:
        raise SecurityError("wordwrap would be too large")


def _check_replace(length: int, args: list[Any]) -> None:
    if len(args) >= 2:
        old, new = _size(args[0]), _size(args[1])
        if (length + 1) * max(new - old, 0) > MAX_RENDER_CHARS:
            raise SecurityError("replace would be too large")


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_context marks
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _spend()
        # pass_* filters get the context / eval context / environment first.
        plain = args[1:] if getattr(f, "jinja_pass_arg", None) else args
        _check_filter(name, plain, kwargs)
        return _bounded(f(*args, **kwargs), f"the {name} filter's result")

    return wrapper


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b` builds its string in the runtime's join helpers, which have no hook: the
    result goes through `environment.bounded_concat` (inputs are bounded, so at worst a few
    times the limit is held for a moment)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat(")
        super().visit_Concat(node, frame)
        self.write(")")


class BoundedEnvironment(SandboxedEnvironment):
    """The sandbox with the limits in the module docstring."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"**", "*", "+", "%"})

    def __init__(self, *, autoescape: bool = False) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=autoescape)
        self.globals.clear()
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # str.format has its own sandboxed formatter, but its widths are unbounded; the
        # `format` filter (printf style, checked) does the same job.
        if isinstance(obj, str) and attr in ("format", "format_map"):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _spend()
        _check_binop(operator, left, right)
        return _bounded(super().call_binop(context, operator, left, right), f"{operator!r}")

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _spend()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(__obj, "__name__", "")
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
                items = list(args[0]) if isinstance(args[0], Iterable) else args[0]
                if len(owner) * len(items) > MAX_RENDER_CHARS:
                    raise SecurityError("str.join would be too large")
                args = (items, *args[1:])
        return _bounded(
            SandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs), "a call"
        )

    def bounded_concat(self, value: Any) -> Any:
        return _bounded(value, "'~'")

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
