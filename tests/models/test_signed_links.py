"""Signed links verify only in their one canonical form: no other spelling of the same bytes
(a changed last character that decodes to the same bits, padding) is accepted."""

from __future__ import annotations

import string

import pytest

from activities.links import BadLink, sign, verify
from activities.tracking import click_token, open_token

SECRET = "link-secret"
B64URL = string.ascii_letters + string.digits + "-_"
TOKENS = {
    "unsubscribe": sign(SECRET, {"c": "cust-1", "ch": "email", "t": "news"}),
    "open": open_token(SECRET, 42),
    "click": click_token(SECRET, 42, "https://shop.example.com/cart?x=1"),
}


@pytest.mark.parametrize("kind", sorted(TOKENS))
def test_the_genuine_link_verifies(kind: str) -> None:
    assert verify(SECRET, TOKENS[kind])


@pytest.mark.parametrize("kind", sorted(TOKENS))
def test_every_other_last_character_fails(kind: str) -> None:
    token = TOKENS[kind]
    accepted = []
    for c in B64URL:
        variant = token[:-1] + c
        if variant == token:
            continue
        try:
            verify(SECRET, variant)
        except BadLink:
            continue
        accepted.append(variant)
    assert accepted == []


@pytest.mark.parametrize("kind", sorted(TOKENS))
@pytest.mark.parametrize("suffix", ["=", "==", "===", " ", "\n"])
def test_padding_or_whitespace_after_the_signature_fails(kind: str, suffix: str) -> None:
    with pytest.raises(BadLink):
        verify(SECRET, TOKENS[kind] + suffix)


@pytest.mark.parametrize("kind", sorted(TOKENS))
def test_a_non_canonical_body_fails(kind: str) -> None:
    """The body is signed as text, but padding or a non-alphabet character in it is refused."""
    body, _, mac = TOKENS[kind].partition(".")
    for bad in (body + "=", body + "+", "+" + body[1:]):
        with pytest.raises(BadLink):
            verify(SECRET, f"{bad}.{mac}")


def test_non_ascii_and_empty_tokens_fail() -> None:
    for bad in ("", ".", "é.é", TOKENS["open"].replace(".", "..")):
        with pytest.raises(BadLink):
            verify(SECRET, bad)
