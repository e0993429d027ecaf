"""Link rewriting for open and click tracking (pure: no database)."""

from __future__ import annotations

import re

import pytest

from activities.links import BadLink, verify
from activities.tracking import instrument

BASE = "https://api.example.com"
SECRET = "s3cret"

HTML = """<html><body>
<!-- <a href="https://commented.example/">not a link</a> -->
<p><a class="btn" title='href="https://decoy.example/"'
      href="https://shop.example/cart?a=1&amp;b=2">Cart</a>
<A HREF=http://up.example/x>up</A> <a href='mailto:ann@example.com'>mail</a>
<a href="tel:+1555">call</a>
<a href="https://api.example.com/v1/unsubscribe/tok">unsubscribe</a></p>
<script>var s = '<a href="https://script.example/">';</script>
<a href=" https://shop.example/cart?a=1&b=2 ">again</a>
</body></html>"""

TEXT = (
    "Your cart: https://shop.example/cart?a=1&b=2. Docs (https://wiki.example/a_(b)) and "
    "https://blog.example/post), mailto:ann@example.com, "
    "unsubscribe: https://api.example.com/v1/unsubscribe/tok"
)


def _tokens(kind: str, part: str) -> list[str]:
    return re.findall(rf"{re.escape(BASE)}/v1/t/{kind}/([\w\-]+\.[\w\-]+)", part)


def test_links_become_signed_redirects_and_originals_are_listed_once_in_order():
    out = instrument(TEXT, HTML, base_url=BASE + "/", secret=SECRET, message_id=42)
    assert out.links == [
        "https://shop.example/cart?a=1&b=2",
        "http://up.example/x",
        "https://wiki.example/a_(b)",
        "https://blog.example/post",
    ]
    clicks = [verify(SECRET, t) for t in _tokens("c", out.html or "")]
    assert clicks == [
        {"k": "c", "m": "42", "u": "https://shop.example/cart?a=1&b=2"},
        {"k": "c", "m": "42", "u": "http://up.example/x"},
        {"k": "c", "m": "42", "u": "https://shop.example/cart?a=1&b=2"},
    ]
    assert [verify(SECRET, t)["u"] for t in _tokens("c", out.text)] == [
        "https://shop.example/cart?a=1&b=2",
        "https://wiki.example/a_(b)",
        "https://blog.example/post",
    ]
    # Sentence punctuation and an unbalanced bracket stay outside the link.
    assert out.text.startswith("Your cart: https://api.example.com/v1/t/c/")
    assert re.search(r"/v1/t/c/[\w\-.]+\. Docs \(https://", out.text)
    assert re.search(r"/v1/t/c/[\w\-.]+\) and https://", out.text)


def test_what_is_not_rewritten():
    out = instrument(TEXT, HTML, base_url=BASE, secret=SECRET, message_id=42)
    html = out.html or ""
    for kept in (
        "mailto:ann@example.com",
        "tel:+1555",
        f"{BASE}/v1/unsubscribe/tok",
        "https://commented.example/",
        "https://script.example/",
        "title='href=\"https://decoy.example/\"'",
    ):
        assert kept in html, kept
    assert "mailto:ann@example.com" in out.text
    assert f"{BASE}/v1/unsubscribe/tok" in out.text
    # Links already pointing at our tracker are left alone (instrumenting twice is harmless).
    again = instrument(out.text, out.html, base_url=BASE, secret=SECRET, message_id=42)
    assert again.text == out.text
    assert again.links == []


def test_open_pixel_before_body_end_or_at_the_end():
    out = instrument("hi", HTML, base_url=BASE, secret=SECRET, message_id=7)
    html = out.html or ""
    [token] = _tokens("o", html)
    assert verify(SECRET, token) == {"k": "o", "m": "7"}
    assert re.search(
        r'<img src="[^"]+/v1/t/o/[^"]+" width="1" height="1"[^>]*></body></html>$', html
    )
    bare = instrument("hi", "<p>no body tag</p>", base_url=BASE, secret=SECRET, message_id=7)
    assert bare.html is not None and bare.html.startswith("<p>no body tag</p><img ")
    assert instrument("hi", None, base_url=BASE, secret=SECRET, message_id=7).html is None


def test_deterministic_and_bound_to_the_message_and_secret():
    one = instrument(TEXT, HTML, base_url=BASE, secret=SECRET, message_id=42)
    assert one == instrument(TEXT, HTML, base_url=BASE, secret=SECRET, message_id=42)
    other = instrument(TEXT, HTML, base_url=BASE, secret=SECRET, message_id=43)
    assert other.html != one.html and other.links == one.links
    with pytest.raises(BadLink):
        verify("another-secret", _tokens("c", one.text)[0])


def test_crlf_and_entities_in_href():
    html = (
        '<body>\r\n<p>\r\n<a\r\n href="https://x.example/?q=a&amp;r=&quot;b&quot;">x</a></p></body>'
    )
    out = instrument("", html, base_url=BASE, secret=SECRET, message_id=1)
    assert out.links == ['https://x.example/?q=a&r="b"']
    assert "x.example" not in (out.html or "")
    assert (out.html or "").startswith(
        '<body>\r\n<p>\r\n<a\r\n href="https://api.example.com/v1/t/c/'
    )
