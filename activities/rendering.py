"""Message templates: Jinja2 in a bounded sandbox; a missing variable is an error, never ''.

The environment and its limits (no globals, no `self`, bounded `**` / `*` / `+` / `%` / `~`,
a step and time budget, MAX_RENDER_CHARS of output) are in models.template_sandbox, shared
with the publish-time checks.

HTML parts are rendered with autoescaping: a trait like `<a href=...>` set through the event
API shows as text, never as markup in the brand's email or the app's inbox. Text parts (email
text, SMS, push) are not HTML and are rendered as they are."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import Template, TemplateError

from models.template_sandbox import MAX_RENDER_CHARS, BoundedEnvironment

_text = BoundedEnvironment(autoescape=False)
_html = BoundedEnvironment(autoescape=True)

__all__ = ["MAX_RENDER_CHARS", "TemplateError", "render", "render_html"]


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
