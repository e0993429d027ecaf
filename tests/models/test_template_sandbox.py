"""Message templates cannot freeze or exhaust the process that renders them, nor reach
Python internals: every such attempt is a TemplateError (the send fails for good, recorded),
refused at publish where it can be seen without data."""

from __future__ import annotations

import threading
import tracemalloc
from typing import Any

import pytest
from jinja2 import TemplateError

from activities.rendering import render, render_html
from models.template_sandbox import MAX_RENDER_CHARS, MAX_STEPS
from models.validation import check_template_sources
from store.templates import InvalidTemplate, check_content
from tests.api.conftest import ADMIN, api, settings  # noqa: F401 (fixtures)

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
    refused = (
        r"steps\[0\].template.body \(step 'boom'\): "
        r"template error: line 1: 7 \*\* 23059204 is too large"
    )
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


# Blow-ups measured in review: each allocated far beyond the limit (or ran for seconds)
# before the size check after it could see anything. Each must now be refused with a
# bounded peak: at most a small multiple of MAX_RENDER_CHARS is ever held.
BIG = {
    **CTX,
    "profile": {
        **CTX["profile"],
        "a1k": "a" * 1000,
        # A list whose rendering is 100 M characters, held as 1000 references to one string
        # (what `[s] * K` built before `*` measured element sizes).
        "bigs": [CTX["profile"]["big"]] * 1000,
    },
}
PEAK_BYTES = 64 * 2**20

BLOW_UPS = [
    # batch / slice return generators: nothing was measured after the filter.
    "{% for r in 'ab'|batch(10**7, 'x') %}{{ r|length }}{% endfor %}",
    "{{ 'ab'|slice(400000)|list|length }}",
    "{{ 'ab'|slice(400000)|sort|length }}",
    # list-mutating methods (their None result was never measured)
    "{% set l = [profile.big] %}{% for i in [1] * 20 %}{{ l.extend(l) }}{% endfor %}{{ l|length }}",
    "{% set l = [1] %}{{ l.append(2) }}{{ l }}",
    "{% set l = [1] %}{{ l.insert(0, 2) }}{{ l }}",
    "{% set l = [1] %}{{ l.pop() }}",
    "{% set d = {} %}{{ d.update({'a': 1}) }}{{ d }}",
    "{% set d = {} %}{{ d.setdefault('a', 1) }}",
    # a list of references, measured by its length, not by what it renders to
    "{% set l = [profile.big] * 1000 %}{{ l|length }}",
    "{{ profile.bigs|map('upper')|list|length }}",
    "{{ profile.bigs|join }}",
    "{{ profile.bigs|string }}",
    "{{ profile.bigs }}",
    "{{ profile.bigs|tojson }}",
    "{{ profile.bigs|pprint }}",
    "{{ profile.bigs|sort|length }}",
    "{{ profile.bigs|unique|list|length }}",
    "{{ profile.bigs|select|list|length }}",
    "{{ profile.bigs|reject('none')|list|length }}",
    "{{ profile.bigs ~ '' }}",
    "{{ '%s' % (profile.bigs,) }}",
    "{{ '%s'|format(profile.bigs) }}",
    "{{ profile.name|replace('A', profile.bigs) }}",
    "{{ [profile.bigs, 1] }}",
    "{% macro m() %}{% for i in [0] * 1000 %}{{ profile.big }}{% endfor %}{% endmacro %}"
    "{{ m()|length }}",
    "{% set x %}{% for i in [0] * 1000 %}{{ profile.big }}{% endfor %}{% endset %}{{ x|length }}",
    # allocations hidden in methods and format strings
    "{{ profile.a1k.translate({97: 'b' * 100000})|length }}",
    "{{ 'a'.encode().center(10**8)|length }}",
    "{{ 'a'.encode() }}",
    "{{ '%(a)100000000s'|format(a=1)|length }}",
    "{{ '%(a)100000000s' % {'a': 1} }}",
    "{{ '%(a)*s' % {'a': 1} }}",
    "{{ '{:>100000000}'.format(1)|length }}",
]


@pytest.mark.parametrize("source", BLOW_UPS)
def test_blow_ups_are_refused_with_bounded_memory(source: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError):
            render(source, BIG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB"


def test_ordinary_filters_loops_and_formats_render_as_before() -> None:
    ctx = {
        **CTX,
        "event": {"items": [{"name": "tea", "qty": 2}, {"name": "cake", "qty": 1}]},
    }
    cases = {
        "{{ [3, 1, 2]|sort|join(', ') }}": "1, 2, 3",
        "{{ event['items']|map(attribute='name')|join('/') }}": "tea/cake",
        "{{ event['items']|selectattr('qty', 'gt', 1)|map(attribute='name')|list }}": "['tea']",
        "{{ event['items']|sum(attribute='qty') }}": "3",
        "{{ [1, 2, 2, 3]|unique|list }}": "[1, 2, 3]",
        "{{ [1, None, 2]|select|list }} {{ [1, None]|reject|list }}": "[1, 2] [None]",
        "{% for row in 'abcde'|batch(2, '-') %}{{ row|join }};{% endfor %}": "ab;cd;e-;",
        "{% for col in [1, 2, 3, 4, 5]|slice(2) %}{{ col }}{% endfor %}": "[1, 2, 3][4, 5]",
        "{{ event['items']|tojson }}": '[{"name": "tea", "qty": 2}, {"name": "cake", "qty": 1}]',
        "{{ {'a': [1, 2]}|pprint }}": "{'a': [1, 2]}",
        "{{ [1, 2]|string }} {{ [1, 2] }} {{ [1] ~ 'x' }}": "[1, 2] [1, 2] [1]x",
        "{{ '%(n)5s' % {'n': 'ab'} }}|{{ '%*d' % (3, 5) }}": "   ab|  5",
        "{{ '%5.2f|%-4s|' % (3.14159, 'x') }}{{ '%(a)3s'|format(a=1) }}": " 3.14|x   |  1",
        "{{ 'abc'.translate({97: 'xy', 98: None}) }}": "xyc",
        "{{ profile.many|length }} {{ profile.many|last }}": "50000 49999",
        "{% set l = [profile.name] * 3 %}{{ l|join(',') }}": "Ada,Ada,Ada",
        "{% macro m(x) %}<{{ x }}>{% endmacro %}{{ m(1) }}": "<1>",
        "{% set y %}[{{ 2 }}]{% endset %}{{ y }}": "[2]",
        "{% filter upper %}hi {{ profile.name }}{% endfilter %}": "HI ADA",
        "{% for k, v in {'a': 1}|dictsort %}{{ k }}={{ v }}{% endfor %}": "a=1",
    }
    for source, expected in cases.items():
        assert render(source, ctx) == expected, source
    assert render_html("{{ [1, '<b>'] }}|{{ ['<i>']|join }}", CTX) == (
        "[1, &#39;&lt;b&gt;&#39;]|&lt;i&gt;"
    )


async def test_rendering_runs_off_the_event_loop(db, ts_env, api, monkeypatch) -> None:  # noqa: F811
    """A render may take up to MAX_SECONDS of CPU: in the worker's send activity and in the
    API's preview it runs in a thread, so the event loop (other activities, other requests,
    the worker's heartbeats) keeps running meanwhile."""
    from models import template_sandbox
    from tests.harness import engine, identify, track

    loop_thread = threading.get_ident()
    threads: list[int] = []
    original = template_sandbox.BoundedEnvironment.render_bounded

    def recording(self, template, context):  # type: ignore[no-untyped-def]
        threads.append(threading.get_ident())
        return original(self, template, context)

    monkeypatch.setattr(template_sandbox.BoundedEnvironment, "render_bounded", recording)

    journey = {
        "id": "threaded",
        "name": "threaded",
        "entry": {"event": "Started"},
        "steps": [{"id": "hi", "kind": "send", "template": {"body": "hi {{ profile.w }}"}}],
    }
    async with engine(db, ts_env) as eng:
        await eng.publish(journey)
        await eng.send(identify("th", w="x"), track("th", "Started"))
        handle = await eng.run("threaded", "th")
        assert (await eng.result(handle)).status == "completed"
        assert [m["body"] for m in await eng.messages("th")] == ["hi x"]
    assert threads and loop_thread not in threads

    threads.clear()
    r = await api.post(
        "/v1/templates",
        json={"id": "t", "name": "t", "channel": "email", "subject": "s", "body": "b {{ 1 }}"},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    await db.execute("INSERT INTO customers (id, traits) VALUES ('pc', '{}')")
    r = await api.post("/v1/templates/t/preview", json={"customer_id": "pc"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["body"] == "b 1"
    assert threads and loop_thread not in threads


async def test_a_variant_that_fails_to_render_fails_only_the_send_that_chooses_it(db, ts_env):
    """Variants are rendered before the channel is chosen (outside the customer's lock); the
    outcome is the one of rendering only the chosen variant."""
    from models.runtime import RunSummary
    from tests.harness import engine, identify, track

    def journey(jid: str, channels: list[str]) -> dict[str, Any]:
        send = {"id": "hi", "kind": "send", "channel": channels,
                "template": {"body": "hi {{ profile.name }}"},
                "variants": {"outbox": {"body": "{{ profile.missing }}"}}}  # fmt: skip
        return {"id": jid, "name": jid, "entry": {"event": "Started"}, "steps": [send]}

    async with engine(db, ts_env) as eng:
        await eng.publish(journey("first_ok", ["in_app", "outbox"]))
        await eng.publish(journey("only_bad", ["outbox"]))
        await eng.send(identify("va", name="Vi"), track("va", "Started"))
        ok = await eng.run("first_ok", "va")
        bad = await eng.run("only_bad", "va")
        await eng.result(ok)
        await eng.result(bad)
        assert (await ok.query("summary", result_type=RunSummary)).results["hi"]["status"] == (
            "sent"
        )
        failed = (await bad.query("summary", result_type=RunSummary)).results["hi"]
        assert failed["status"] == "failed" and "TemplateError" in failed["error"]
        # The failed render is recorded as a failed message (shown in reports), nothing sent.
        sent = sorted((m["channel"], m["status"], m["body"]) for m in await eng.messages("va"))
        assert sent == [("in_app", "sent", "hi Vi"), ("outbox", "failed", "")]
