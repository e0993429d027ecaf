"""Message templates cannot freeze or exhaust the process that renders them, nor reach
Python internals: every such attempt is a TemplateError (the send fails for good, recorded),
refused at publish where it can be seen without data."""

from __future__ import annotations

import pytest
from jinja2 import TemplateError

from activities.rendering import render, render_html
from models.template_sandbox import MAX_RENDER_CHARS, MAX_STEPS
from models.validation import check_template_sources
from store.templates import InvalidTemplate, check_content

CTX = {
    "profile": {
        "name": "Ada",
        "n": 3,
        "big": "x" * 100_000,
        "nl": "\n" * 1000,
        "quotes": '"' * 100_000,
        "many": list(range(50_000)),
    },
    "customer": {"id": "c1"},
    "event": {},
    "journey": {"id": "j", "version": 1},
}

# Each is refused when published (constant, or a name / tag the sandbox does not have).
REFUSED_AT_PUBLISH = [
    "{{ (7**23059204) % 10 }}",
    "{{ 'a'*200000000 }}",
    "{{ [1] * 10**9 }}",
    "{{ lipsum }}",
    "{{ cycler }}",
    "{{ joiner }}",
    "{{ namespace }}",
    "{{ range(10**9) }}",
    "{{ dict(a=1) }}",
    "{{ self }}",
    "{{ self.__init__ }}",
    "{% set self = 1 %}",
    "{% include 'x' %}",
    "{% extends 'x' %}",
    "{% import 'x' as y %}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].environ }}",
    "{{ config }}",
    "{{ request }}",
]

# Escapes and blow-ups that only show with data, or hide behind an expression.
REFUSED_AT_RENDER = [
    *REFUSED_AT_PUBLISH,
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ profile.__class__ }}",
    "{{ profile.name.__class__.__base__.__subclasses__() }}",
    "{{ profile.items.__globals__ }}",
    "{{ customer.__init__.__globals__ }}",
    "{{ profile.name.format.__globals__ }}",
    "{{ '{0.__class__}'.format(profile.name) }}",
    "{{ ''.join.__self__.__class__ }}",
    "{{ (profile.n + 7) ** (profile.n * 10000000) }}",
    "{{ profile.big * 100 }}",
    "{{ profile.many * 100 }}",
    "{{ profile.big + profile.big + profile.big + profile.big + profile.big + profile.big }}",
    "{% set a = profile.big %}{% set a = a ~ a ~ a ~ a ~ a ~ a %}{{ a|length }}",
    "{{ profile.name|center(10**9) }}",
    "{{ profile.name.center(10**9) }}",
    "{{ profile.name.ljust(10**9) }}",
    "{{ profile.nl|indent(10**5) }}",
    "{{ profile.many|join(profile.big) }}",
    "{{ profile.big.join(profile.many|map('string')) }}",
    "{{ profile.big|replace('x', profile.big) }}",
    "{{ profile.big.replace('', profile.big[:100]) }}",
    "{{ '%999999999s'|format(1) }}",
    "{{ '%*s' % (10**9, 'a') }}",
    "{% for i in profile.many %}{% for j in profile.many %}{% endfor %}{% endfor %}",
    "{% for i in profile.many %}{{ profile.big }}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ profile.quotes|tojson|tojson|tojson|tojson|tojson|tojson|tojson|tojson|tojson }}",
]


@pytest.mark.parametrize("source", REFUSED_AT_RENDER)
@pytest.mark.parametrize("html", [False, True], ids=["text", "html"])
def test_refused_when_rendered_as_a_template_error(source: str, html: bool) -> None:
    with pytest.raises(TemplateError):
        render(source, CTX, html=html)


@pytest.mark.parametrize("source", REFUSED_AT_PUBLISH)
def test_refused_at_publish_and_when_a_stored_template_is_written(source: str) -> None:
    with pytest.raises(ValueError, match=r"^body: "):
        check_template_sources([("body", source)])
    with pytest.raises(InvalidTemplate, match=r"^html: "):
        check_content(subject="hi", body="ok", html=source)


def test_reading_environment_variables_fails_safely(monkeypatch) -> None:
    monkeypatch.setenv("JOURNEYS_TEST_SECRET", "s3cret")
    for source in (
        "{{ lipsum.__globals__['os'].environ['JOURNEYS_TEST_SECRET'] }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ profile.get.__self__ }}",
        "{{ customer.__class__.__init__.__globals__['os'] }}",
    ):
        try:
            out = render(source, CTX)
        except TemplateError:
            continue
        assert "s3cret" not in out


def test_ordinary_templates_still_work() -> None:
    source = (
        "Hi {{ profile.name|upper }}! {{ 2 ** 10 }} {{ profile.n * 2 }} {{ 'ab' * 3 }} "
        "{{ [1, 2] * 2 }} {{ 'a' ~ 'b' }} {{ '%05.1f'|format(3.14159) }} {{ '%s!' % 'hey' }} "
        "{% for i in [1, 2, 3] %}{{ loop.index }}{% endfor %} "
        "{% macro hi(n) %}<{{ n }}>{% endmacro %}{{ hi(1) }} {{ profile.name.replace('A', 'E') }} "
        "{{ ', '.join(['x', 'y']) }} {{ profile.name|center(7) }}|"
    )
    assert render(source, CTX) == (
        "Hi ADA! 1024 6 ababab [1, 2, 1, 2] ab 003.1 hey! 123 <1> Eda x, y   Ada  |"
    )
    assert render_html("<b>{{ profile.name }}</b>", {"profile": {"name": "<i>"}}) == (
        "<b>&lt;i&gt;</b>"
    )
    check_template_sources([("body", source)])


def test_the_limits_are_exact_at_the_edge() -> None:
    assert len(render("{{ 'a' * n }}", {"n": MAX_RENDER_CHARS})) == MAX_RENDER_CHARS
    with pytest.raises(TemplateError):
        render("{{ 'a' * n }}", {"n": MAX_RENDER_CHARS + 1})
    with pytest.raises(TemplateError):  # the output as a whole is capped too
        render("{{ 'a' * n }}{{ 'b' }}", {"n": MAX_RENDER_CHARS})
    steps = MAX_STEPS // 2
    assert render("{% for i in x %}{% endfor %}ok", {"x": list(range(steps))}) == "ok"


def test_a_journey_with_a_constant_blow_up_is_refused_at_publish() -> None:
    from store.journeys import DefinitionError, parse_definition

    steps = [{"id": "boom", "kind": "send", "template": {"body": "{{ (7**23059204) % 10 }}"}}]
    refused = r"step 'boom': template.body: template error: line 1: 7 \*\* 23059204 is too large"
    with pytest.raises(DefinitionError, match=refused):
        parse_definition({"id": "j", "name": "j", "entry": {"event": "E"}, "steps": steps})


async def test_a_blow_up_hidden_in_data_fails_that_send_not_the_worker(db, ts_env) -> None:
    from models.runtime import RunSummary
    from tests.harness import engine, identify, track

    journey = {
        "id": "blow_up",
        "name": "blow up",
        "entry": {"event": "Started"},
        "steps": [
            {"id": "boom", "kind": "send", "template": {"body": "{{ profile.w * profile.n }}"}},
            {"id": "after", "kind": "send", "template": {"body": "still here"}},
        ],
    }
    async with engine(db, ts_env) as eng:
        await eng.publish(journey)
        await eng.send(identify("bu", w="a", n=200_000_000), track("bu", "Started"))
        handle = await eng.run("blow_up", "bu")
        # The run goes on; the failed send is counted and stored as a failed message.
        assert (await eng.result(handle)).status == "completed_with_failures"
        summary = await handle.query("summary", result_type=RunSummary)
        assert summary.results["boom"]["status"] == "failed"
        assert "TemplateError" in summary.results["boom"]["error"]
        sent = [(m["status"], m["body"]) for m in await eng.messages("bu")]
        assert sent == [("failed", ""), ("sent", "still here")]
