"""Open and click tracking: links in a rendered message become signed redirects.

Every http(s) link (`href` of `<a>` / `<area>` in the HTML part, bare URLs in the text part)
becomes `{base}/v1/t/c/{token}`, the token signing the message id and the original URL; the
HTML part gets a 1x1 pixel `{base}/v1/t/o/{token}`. Tokens carry a kind (`k`: `c` click,
`o` open) so one cannot stand in for the other. The redirect only goes to URLs recorded in the
message's `links`, so a token is never an open redirect even if the secret leaked.

Pure and deterministic: a retried send renders, and instruments, the same message.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from html import escape, unescape
from html.parser import HTMLParser

from activities.links import sign

_TEXT_URL = re.compile(r"https?://[^\s<>\"'`]+", re.IGNORECASE)
_TRAILING = ".,;:!?"
_CLOSERS = {")": "(", "]": "[", "}": "{"}
# One attribute of a start tag, scanned left to right so a value that contains `href=` is
# never taken for the attribute itself.
_ATTR = re.compile(r"""[\s/]*(?P<name>[^\s/>"'=]+)(?:\s*=\s*(?P<value>"[^"]*"|'[^']*'|[^\s>]*))?""")
_TAG_NAME = re.compile(r"<[^\s/>]+")
# The original URL → its redirect, or None to leave the link as it is.
_Redirect = Callable[[str], str | None]


@dataclass(frozen=True)
class Instrumented:
    text: str
    html: str | None
    links: list[str]


def click_token(secret: str, message_id: int, url: str) -> str:
    return sign(secret, {"k": "c", "m": str(message_id), "u": url})


def open_token(secret: str, message_id: int) -> str:
    return sign(secret, {"k": "o", "m": str(message_id)})


def instrument(
    text: str, html: str | None, *, base_url: str, secret: str, message_id: int
) -> Instrumented:
    """Rewrite a message's links into signed click redirects and add an open pixel.

    Args:
        text: the plain-text part; bare http(s) URLs are rewritten.
        html: the HTML part, if any; `href`s of `<a>` and `<area>` are rewritten and a 1x1
            pixel is added before `</body>` (or at the end).
        base_url: the API's public URL (`PUBLIC_URL`).
        secret: `LINK_SECRET`.
        message_id: the `messages.id` the tokens point at.

    Returns:
        The rewritten parts and `links`: the distinct original URLs, HTML first, in order of
        appearance (what `messages.links` must hold for the redirects to work).
    """
    base = base_url.rstrip("/")
    own = (f"{base}/v1/unsubscribe/", f"{base}/v1/t/")
    links: dict[str, None] = {}

    def redirect(url: str) -> str | None:
        if not url.lower().startswith(("http://", "https://")) or url.startswith(own):
            return None
        links.setdefault(url, None)
        return f"{base}/v1/t/c/{click_token(secret, message_id, url)}"

    new_html = None
    if html is not None:
        pixel = (
            f'<img src="{base}/v1/t/o/{open_token(secret, message_id)}" width="1" height="1" '
            f'alt="" style="border:0;width:1px;height:1px">'
        )
        new_html = _rewrite_html(html, redirect, pixel)
    return Instrumented(text=_rewrite_text(text, redirect), html=new_html, links=list(links))


def _rewrite_text(text: str, redirect: _Redirect) -> str:
    def one(m: re.Match[str]) -> str:
        url, tail = _trim(m.group(0))
        new = redirect(url)
        return (new if new is not None else url) + tail

    return _TEXT_URL.sub(one, text)


def _trim(url: str) -> tuple[str, str]:
    """Sentence punctuation and an unbalanced closing bracket after a URL are not part of it."""
    end = len(url)
    while end > 0:
        c = url[end - 1]
        if c in _TRAILING or (
            c in _CLOSERS and url.count(_CLOSERS[c], 0, end) < url.count(c, 0, end)
        ):
            end -= 1
            continue
        break
    return url[:end], url[end:]


class _TagFinder(HTMLParser):
    """Where the link tags and the closing `</body>` are (skips comments, scripts, styles)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[tuple[int, int], str]] = []
        self.body_end: tuple[int, int] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("a", "area") and any(k == "href" for k, _ in attrs):
            raw = self.get_starttag_text()
            if raw:
                self.tags.append((self.getpos(), raw))

    handle_startendtag = handle_starttag

    def handle_endtag(self, tag: str) -> None:
        if tag == "body":
            self.body_end = self.getpos()


def _rewrite_html(html: str, redirect: _Redirect, pixel: str) -> str:
    finder = _TagFinder()
    finder.feed(html)
    finder.close()
    # HTMLParser reports (line, column) with lines split on "\n" only.
    starts = [0]
    for i, c in enumerate(html):
        if c == "\n":
            starts.append(i + 1)

    def offset(pos: tuple[int, int]) -> int:
        return starts[pos[0] - 1] + pos[1]

    edits: list[tuple[int, int, str]] = []
    for pos, raw in finder.tags:
        at = offset(pos)
        if html[at : at + len(raw)] != raw:
            continue  # never guess: a tag we cannot locate exactly stays as it is
        new = _rewrite_tag(raw, redirect)
        if new != raw:
            edits.append((at, at + len(raw), new))
    end = len(html)
    if finder.body_end is not None and html.startswith("</", offset(finder.body_end)):
        end = offset(finder.body_end)
    edits.append((end, end, pixel))
    out, last = [], 0
    for start, stop, new in sorted(edits, key=lambda e: e[0]):
        out.append(html[last:start])
        out.append(new)
        last = stop
    out.append(html[last:])
    return "".join(out)


def _rewrite_tag(raw: str, redirect: _Redirect) -> str:
    name = _TAG_NAME.match(raw)
    pos = name.end() if name else 1
    while m := _ATTR.match(raw, pos):
        if m.end() == pos:
            break
        pos = m.end()
        if m.group("name").lower() != "href" or m.group("value") is None:
            continue
        value = m.group("value")
        quoted = value[:1] in ("'", '"')
        url = unescape(value[1:-1] if quoted else value).strip()
        new = redirect(url)
        if new is None:
            return raw
        start, stop = m.span("value")
        return f'{raw[:start]}"{escape(new, quote=True)}"{raw[stop:]}'
    return raw
