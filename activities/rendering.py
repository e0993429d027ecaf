"""Message templates: Jinja2 in a sandbox; a missing variable is an error, never ''."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import SandboxedEnvironment

_env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)

__all__ = ["TemplateError", "render"]


@lru_cache(maxsize=1024)
def _compiled(source: str) -> Template:
    return _env.from_string(source)


def render(source: str, context: dict[str, Any]) -> str:
    """Any failure while rendering (a missing variable, `"x" + 1`, a division by zero in the
    customer's data) is a TemplateError: the send fails for good instead of retrying forever."""
    try:
        return _compiled(source).render(**context)
    except TemplateError:
        raise
    except Exception as err:
        raise TemplateError(f"{type(err).__name__}: {err}") from err
