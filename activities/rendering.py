"""Message templates: Jinja2 in a sandbox; a missing variable is an error, never ''.

HTML parts are rendered with autoescaping: a trait like `<a href=...>` set through the event
API shows as text, never as markup in the brand's email or the app's inbox. Text parts (email
text, SMS, push) are not HTML and are rendered as they are."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import SandboxedEnvironment

_text = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_html = SandboxedEnvironment(undefined=StrictUndefined, autoescape=True)

__all__ = ["TemplateError", "render", "render_html"]


@lru_cache(maxsize=1024)
def _compiled(source: str, html: bool = False) -> Template:
    return (_html if html else _text).from_string(source)


def render_html(source: str, context: dict[str, Any]) -> str:
    return render(source, context, html=True)


def render(source: str, context: dict[str, Any], *, html: bool = False) -> str:
    """Any failure while rendering (a missing variable, `"x" + 1`, a division by zero in the
    customer's data) is a TemplateError: the send fails for good instead of retrying forever."""
    try:
        return _compiled(source, html).render(**context)
    except TemplateError:
        raise
    except Exception as err:
        raise TemplateError(f"{type(err).__name__}: {err}") from err
