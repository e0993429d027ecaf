"""Message templates: Jinja2 in a bounded sandbox; a missing variable is an error, never ''.

The environment and its limits (no globals, no `self`, bounded `**` / `*` / `+` / `%` / `~`,
a step and time budget, MAX_RENDER_CHARS of output) are in models.template_sandbox, shared
with the publish-time checks.

HTML parts are rendered with autoescaping: a trait like `<a href=...>` set through the event
API shows as text, never as markup in the brand's email or the app's inbox. Text parts (email
text, SMS, push) are not HTML and are rendered as they are.

A render may use its whole budget (MAX_SECONDS of CPU): callers on an event loop (the send
activity, the API's preview and test send) render through `off_loop`, in a small pool of
threads of its own, so the loop keeps serving other activities, heartbeats and requests (the
GIL is handed back every few milliseconds), and so renders never take the default executor's
threads that DNS lookups and other `to_thread` work use."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, ParamSpec, TypeVar

from jinja2 import Template, TemplateError

from models.template_sandbox import MAX_RENDER_CHARS, BoundedEnvironment

_text = BoundedEnvironment(autoescape=False)
_html = BoundedEnvironment(autoescape=True)

__all__ = ["MAX_RENDER_CHARS", "TemplateError", "off_loop", "render", "render_html"]

P = ParamSpec("P")
R = TypeVar("R")

# Two threads: the machines this runs on have about two cores, and more threads would only
# make concurrent renders share the GIL (each still bounded by its own deadline).
_RENDER_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="template-render")


async def off_loop(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(*args, **kwargs)` (something that renders) in the render threads, awaited.

    Exceptions raised by `fn` (a TemplateError, an API error naming the field) propagate.
    A cancelled caller stops waiting; the render itself ends within its budget."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_RENDER_THREADS, functools.partial(fn, *args, **kwargs))


@lru_cache(maxsize=1024)
def _compiled(source: str, html: bool = False) -> Template:
    return (_html if html else _text).from_string(source)


def render_html(source: str, context: dict[str, Any]) -> str:
    return render(source, context, html=True)


def render(source: str, context: dict[str, Any], *, html: bool = False) -> str:
    """Any failure while rendering (a missing variable, `"x" + 1`, a division by zero in the
    customer's data, a limit of the sandbox) is a TemplateError: the send fails for good
    instead of retrying forever."""
    env = _html if html else _text
    try:
        return env.render_bounded(_compiled(source, html), context)
    except TemplateError:
        raise
    except Exception as err:  # MemoryError, RecursionError, OverflowError, TypeError...
        raise TemplateError(f"{type(err).__name__}: {err}") from err
