"""The sanitize policy end to end, on both engines (nh3 and bleach), over 127.0.0.1.

The XSS corpus (tests/xss_corpus.py) goes through the gateway in nested JSON, form and query
positions, and what the upstream receives is checked two ways: parsed with an HTML5 parser
(html5lib, as bleach vendors it), where no element, attribute or URL that could run script may
appear; and placed into a page in Debian's chromium (driven by the playwright package, never
`playwright install`), where nothing may run. A control run of that page with the raw vectors
proves the page detects script that runs. Where the engines' outputs differ for one input, a test
pins both outputs.
"""

from __future__ import annotations

import json
import re
from typing import Any, AsyncIterator
from urllib.parse import parse_qsl, urlencode

import aiohttp
import pytest
from bleach._vendor import html5lib  # type: ignore[attr-defined]
from playwright.async_api import Browser, Dialog, Route, async_playwright
from yarl import URL

from gateway.config import parse_config
from gateway.errors import ConfigError
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, assert_problem, base_config
from tests.xss_corpus import CATEGORIES, VECTORS, Vector, render

ENGINES = ("nh3", "bleach")

# Three ways a route may sanitize: plain text (the default), HTML-escaped text, and a rich-text
# field that keeps some markup. The corpus runs through each, on each engine.
RICH_TAGS = {"a": {"href", "title"}, "b": set(), "i": set(), "p": set(), "img": {"src", "alt"}}
PROFILES: dict[str, dict[str, Any]] = {
    "text": {},
    "html": {"output": "html"},
    "rich": {"allowed_tags": sorted(RICH_TAGS), "allowed_attributes": {tag: sorted(names) for tag, names in RICH_TAGS.items() if names}},
}
ALLOWED: dict[str, dict[str, set[str]]] = {"text": {}, "html": {}, "rich": RICH_TAGS}
# Elements that run or load script or change how the page is read; never allowed anywhere.
FORBIDDEN = frozenset({"script", "style", "iframe", "svg", "math", "object", "embed", "base", "meta", "link"})
SCRIPT_SCHEMES = ("javascript:", "vbscript:", "data:")
# What may follow the value in the upstream's page: a tag left open by the value closes there.
SUFFIXES = ("", ">", '">', "'>")
QUERY_CHUNK = 4000  # characters of query string per request (the request line limit is 8 KiB)


def sanitize_config(upstream_url: str, **sanitize: Any) -> dict[str, Any]:
    config = base_config(upstream_url)
    config["routes"][0]["sanitize"] = {"mode": "strip", **sanitize}
    return config


def corpus_config(upstream_url: str, engine: str) -> dict[str, Any]:
    """One route per profile (/text, /html, /rich), each sanitizing bodies and queries."""
    config = base_config(upstream_url)
    config["routes"] = [
        {"name": name, "match": {"path": f"/{name}"}, "upstream": "api", "sanitize": {"mode": "strip", "engine": engine, "query": True, **settings}}
        for name, settings in PROFILES.items()
    ]
    return config


async def post_json(client: aiohttp.ClientSession, url: str, document: Any) -> tuple[int, bytes]:
    async with client.post(url, data=json.dumps(document), headers={"Content-Type": "application/json"}) as response:
        return response.status, await response.read()


def strict_json(data: bytes) -> Any:
    """Parse JSON as RFC 8259 has it: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(data, parse_constant=refuse)


# -- the corpus through the gateway ------------------------------------------------------------


async def corpus_received(gateway_url: str, profile: str, client: aiohttp.ClientSession, upstream: Any) -> dict[str, list[str]]:
    """Send every vector in each position; return, per position, what the upstream received (by n)."""
    vectors = [render(vector, n) for n, vector in enumerate(VECTORS)]
    first = len(upstream.requests)

    document = {"cases": [{"n": n, "user": {"profile": {"bio": value}}, "tags": ["ok", value]} for n, value in enumerate(vectors)]}
    status, _ = await post_json(client, f"{gateway_url}/{profile}/json", document)
    assert status == 200
    received = strict_json(upstream.requests[first].body)["cases"]
    assert [case["n"] for case in received] == list(range(len(vectors)))

    async with client.post(f"{gateway_url}/{profile}/form", data=[(f"v{n}", value) for n, value in enumerate(vectors)]) as response:
        assert response.status == 200
    form = dict(parse_qsl(upstream.requests[first + 1].body.decode(), keep_blank_values=True))

    chunks: list[list[tuple[str, str]]] = [[]]
    for n, value in enumerate(vectors):
        pair = (f"v{n}", value)
        if chunks[-1] and len(urlencode([*chunks[-1], pair])) > QUERY_CHUNK:
            chunks.append([])
        chunks[-1].append(pair)
    query: dict[str, str] = {}
    for chunk in chunks:
        async with client.get(URL(f"{gateway_url}/{profile}/query?{urlencode(chunk)}", encoded=True)) as response:
            assert response.status == 200
        query.update(parse_qsl(upstream.requests[-1].path.partition("?")[2], keep_blank_values=True))

    return {
        "json user.profile.bio": [case["user"]["profile"]["bio"] for case in received],
        "json tags[1]": [case["tags"][1] for case in received],
        "form": [form[f"v{n}"] for n in range(len(vectors))],
        "query": [query[f"v{n}"] for n in range(len(vectors))],
    }


def script_capable(value: str, allowed: dict[str, set[str]]) -> list[str]:
    """What an HTML5 parser finds in the value (and the value closed by a following tag) that could run script."""
    findings = []
    for suffix in SUFFIXES:
        fragment = html5lib.parseFragment(value + suffix, treebuilder="etree", namespaceHTMLElements=False)
        for node in fragment.iter():
            if node is fragment:
                continue
            if not isinstance(node.tag, str):  # comments are removed, so none may arrive
                findings.append(f"comment{' before ' + suffix if suffix else ''}")
                continue
            name = node.tag.rsplit("}", 1)[-1].lower()
            if name in FORBIDDEN or name not in allowed or "}" in node.tag:  # "}": SVG or MathML
                findings.append(f"<{node.tag}>")
            for attribute, attribute_value in node.attrib.items():
                attribute_name = attribute.rsplit("}", 1)[-1].lower()
                if attribute_name.startswith("on") or attribute_name not in allowed.get(name, set()):
                    findings.append(f"<{name} {attribute}>")
                # A URL parser drops leading controls and spaces and every tab and newline.
                if re.sub(r"[\x00-\x20]", "", attribute_value).lower().startswith(SCRIPT_SCHEMES):
                    findings.append(f"<{name} {attribute}={attribute_value!r}>")
    return findings


def test_the_corpus_holds_at_least_100_vectors_in_every_category() -> None:
    assert len(VECTORS) >= 100
    assert {vector.category for vector in VECTORS} == set(CATEGORIES)
    assert len({render(vector, 0) for vector in VECTORS}) == len(VECTORS)  # no vector twice


def test_the_parser_check_finds_script_in_every_raw_vector_a_fragment_parser_keeps() -> None:
    """The check is proven on the raw corpus: only <body> and <frameset>, which a fragment parser drops, pass."""
    passed = [vector.template for n, vector in enumerate(VECTORS) if not script_capable(render(vector, n), ALLOWED["text"])]
    assert passed == ["<body onload=$JS>", "<frameset onload=$JS>"]


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("engine", ENGINES)
async def test_no_corpus_vector_reaches_the_upstream_with_an_element_or_attribute_that_could_run_script(
    engine: str, profile: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(corpus_config(upstream.url, engine))
    positions = await corpus_received(gateway.url, profile, client, upstream)
    checked: dict[str, list[str]] = {}
    failures = []
    for position, values in positions.items():
        for n, value in enumerate(values):
            findings = checked.setdefault(value, script_capable(value, ALLOWED[profile]))
            if findings:
                failures.append(f"vector {n} ({VECTORS[n].category}) in {position}: {render(VECTORS[n], n)!r} arrived as {value!r}: {findings}")
    assert failures == []
    # Positions do not change what a value becomes.
    assert positions["json user.profile.bio"] == positions["json tags[1]"] == positions["form"] == positions["query"]


# -- the corpus in a browser -------------------------------------------------------------------

PAGE = """<!doctype html><html><head><meta charset="utf-8"><script>
window.__xss = [];
window.alert = window.confirm = window.prompt = (message) => window.__xss.push("alert:" + message);
</script></head><body><div id="root"></div></body></html>"""

# Each string goes into its own div twice: with innerHTML (as most pages insert HTML), and as a
# contextual fragment, which runs <script> elements as innerHTML does not. Then image errors and
# the like get time to fire, every link and button is clicked (javascript: URLs, form actions),
# one at a time so that each javascript: navigation runs, and the page settles again.
INSERT = """async ([strings, settle]) => {
  const root = document.getElementById("root");
  for (const [n, html] of strings) {
    const inner = document.createElement("div");
    inner.dataset.n = n;
    root.appendChild(inner);
    inner.innerHTML = html;
    const fragment = document.createElement("div");
    fragment.dataset.n = n;
    root.appendChild(fragment);
    fragment.appendChild(document.createRange().createContextualFragment(html));
  }
  const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  await pause(settle);
  for (const element of root.querySelectorAll("a, area, button, input, [onclick]")) {
    element.dispatchEvent(new MouseEvent("click", {bubbles: true, cancelable: true}));
    await pause(20);
  }
  await pause(settle);
  return window.__xss;
}"""
CANARY = -1  # a vector known to run, inserted after the others: the page still detects script


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


async def run_in_page(browser: Browser, strings: list[tuple[int, str]]) -> list[Any]:
    """Insert the strings into one page; return what ran (vector numbers, alert messages, dialogs)."""
    page = await browser.new_page()
    dialogs: list[str] = []

    async def dismiss(dialog: Dialog) -> None:  # alert() inside frames, which the page cannot hook
        dialogs.append(f"dialog:{dialog.message}")
        await dialog.dismiss()

    async def refuse(route: Route) -> None:  # nothing leaves the machine
        await route.abort()

    page.on("dialog", dismiss)
    await page.route("**/*", refuse)
    await page.set_content(PAGE)
    ran = await page.evaluate(INSERT, [strings, 500])
    await page.close()
    return [*ran, *dialogs]


async def test_the_raw_corpus_runs_script_in_the_browser_page(browser: Browser) -> None:
    """The control run: without the gateway, most vectors run, so the page does detect script."""
    ran = await run_in_page(browser, [(n, render(vector, n)) for n, vector in enumerate(VECTORS)])
    vectors_that_ran = {entry for entry in ran if isinstance(entry, int)}
    assert len(vectors_that_ran) >= 60, sorted(vectors_that_ran)
    categories = {VECTORS[n].category for n in vectors_that_ran}
    assert {"script", "event-handler", "javascript-url", "svg", "mathml", "mutation", "entity-encoded", "mixed-case", "comment", "unclosed"} <= categories


@pytest.mark.parametrize("engine", ENGINES)
async def test_no_string_the_upstream_receives_from_the_corpus_runs_script_in_a_browser(
    engine: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession, browser: Browser
) -> None:
    gateway = await start_gateway(corpus_config(upstream.url, engine))
    received: dict[str, int] = {}
    for profile in PROFILES:
        for values in (await corpus_received(gateway.url, profile, client, upstream)).values():
            for n, value in enumerate(values):
                for suffix in ('">', ""):  # alone, and closed by what may follow it in a page
                    received.setdefault(value + suffix, n)
    strings = [(n, value) for value, n in received.items()]
    canary = (CANARY, render(Vector("event-handler", "<img src=x onerror=$JS>"), CANARY))
    ran = await run_in_page(browser, [*strings, canary])
    # The canary runs twice (innerHTML, fragment): the page was still detecting script at the end.
    assert ran == [CANARY, CANARY], [(entry, render(VECTORS[entry], entry)) for entry in ran if isinstance(entry, int) and entry >= 0]


# -- text and HTML output ----------------------------------------------------------------------

READABLE = {"amp": "Tom & Jerry", "lt": "a < b", "gt": "5 > 3", "escaped": "&lt;b&gt;"}


@pytest.mark.parametrize("engine", ENGINES)
async def test_output_text_keeps_ampersands_and_angle_brackets_readable_and_the_body_untouched(
    engine: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(sanitize_config(upstream.url, engine=engine))
    raw = json.dumps(READABLE).encode()
    async with client.post(gateway.url + "/notes", data=raw, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 200
    # Nothing in them is markup, so the body is forwarded as it came: "&lt;b&gt;" stays as the
    # client wrote it (it is text that happens to look like an entity).
    assert upstream.requests[0].body == raw
    assert strict_json(upstream.requests[0].body) == {"amp": "Tom & Jerry", "lt": "a < b", "gt": "5 > 3", "escaped": "&lt;b&gt;"}


@pytest.mark.parametrize("engine", ENGINES)
async def test_output_text_decodes_what_the_engine_escaped_but_writes_a_tag_opening_lt_as_an_entity(
    engine: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(sanitize_config(upstream.url, engine=engine))
    document = {
        "amp": "<b>Tom & Jerry</b>",
        "lt": "<i>a < b</i>",
        "gt": "<p>5 > 3</p>",
        # The entities decode to "<b>", whose "<" would open a tag: it is written "&lt;" again.
        "escaped": "<b>&lt;b&gt;</b>",
        "quotes": "<b>\"double\" and 'single'</b>",
    }
    status, _ = await post_json(client, gateway.url + "/notes", document)
    assert status == 200
    assert strict_json(upstream.requests[0].body) == {
        "amp": "Tom & Jerry",
        "lt": "a < b",
        "gt": "5 > 3",
        "escaped": "&lt;b>",
        "quotes": "\"double\" and 'single'",
    }


@pytest.mark.parametrize("engine", ENGINES)
async def test_output_html_escapes_ampersands_and_angle_brackets_with_or_without_markup(
    engine: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(sanitize_config(upstream.url, engine=engine, output="html"))
    document = {**READABLE, "marked_amp": "<b>Tom & Jerry</b>", "marked_gt": "<p>5 > 3</p>", "plain": "no markup"}
    status, _ = await post_json(client, gateway.url + "/notes", document)
    assert status == 200
    assert strict_json(upstream.requests[0].body) == {
        "amp": "Tom &amp; Jerry",
        "lt": "a &lt; b",
        "gt": "5 &gt; 3",
        "escaped": "&lt;b&gt;",  # already HTML for the text <b>: it stays as it is
        "marked_amp": "Tom &amp; Jerry",
        "marked_gt": "5 &gt; 3",
        "plain": "no markup",
    }


@pytest.mark.parametrize("output", ["text", "html"])
@pytest.mark.parametrize("engine", ENGINES)
async def test_script_style_and_similar_contents_and_comments_are_removed_not_turned_into_text(
    engine: str, output: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(sanitize_config(upstream.url, engine=engine, output=output))
    document = {
        "script": "Hello <script>alert('owned')</script>world",
        "style": "Hello <style>body { display: none }</style>world",
        "comment": "Hello <!-- secret note -->world",
        "others": "Hello <textarea>t</textarea><title>t</title><noscript>n</noscript><template>t</template>"
        "<iframe>i</iframe><svg><text>s</text></svg><math><mi>m</mi></math>world",
        "unclosed": "Hello world<script>alert('owned')",
    }
    status, _ = await post_json(client, gateway.url + "/notes", document)
    assert status == 200
    assert strict_json(upstream.requests[0].body) == dict.fromkeys(document, "Hello world")


# -- rich text ---------------------------------------------------------------------------------

RICH_INPUT = (
    '<p><b>Bold</b> <i title="t">it</i> <a href="https://example.com/x?a=1&b=2" title="docs" onclick="steal()">docs</a> '
    '<a href="javascript:alert(1)">bad</a> <a href="http://example.com/">plain http</a> '
    '<a href="mailto:ada@example.com">mail</a><img src=x onerror=alert(1)><script>alert(2)</script></p>'
)
RICH_OUTPUT = (
    '<p><b>Bold</b> <i>it</i> <a href="https://example.com/x?a=1&amp;b=2" title="docs">docs</a> '
    "<a>bad</a> <a>plain http</a> "
    '<a href="mailto:ada@example.com">mail</a></p>'
)


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_rich_text_field_keeps_its_allowed_markup_and_loses_every_unsafe_url(
    engine: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    """Only the configured attributes survive (nh3 would keep title and lang on every tag by default)."""
    config = sanitize_config(
        upstream.url,
        engine=engine,
        allowed_tags=["p", "b", "i", "a"],
        allowed_attributes={"a": ["href", "title"]},
        allowed_protocols=["https", "mailto"],
        fields=["bio"],
    )
    gateway = await start_gateway(config)
    status, _ = await post_json(client, gateway.url + "/profile", {"bio": RICH_INPUT, "name": "Ada & <b>Bob</b>"})
    assert status == 200
    received = strict_json(upstream.requests[0].body)
    assert received == {"bio": RICH_OUTPUT, "name": "Ada & <b>Bob</b>"}  # name is not in fields


# -- which strings, keys and values ------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_fields_limits_sanitizing_to_those_paths(engine: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(sanitize_config(upstream.url, engine=engine, fields=["bio", "items[].note"]))
    document = {
        "bio": "<b>Ada</b>",
        "name": "<b>kept</b>",
        "nested": {"bio": "<b>kept: not the top-level bio</b>"},
        "items": [{"note": "<i>one</i>", "sku": "<i>kept</i>"}, {"note": "<u>two</u>"}],
    }
    status, _ = await post_json(client, gateway.url + "/profile", document)
    assert status == 200
    assert strict_json(upstream.requests[0].body) == {
        "bio": "Ada",
        "name": "<b>kept</b>",
        "nested": {"bio": "<b>kept: not the top-level bio</b>"},
        "items": [{"note": "one", "sku": "<i>kept</i>"}, {"note": "two"}],
    }


@pytest.mark.parametrize("keys", [True, False])
@pytest.mark.parametrize("engine", ENGINES)
async def test_object_keys_and_form_field_names_are_cleaned_only_with_keys_true(
    engine: str, keys: bool, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(sanitize_config(upstream.url, engine=engine, keys=keys))
    document = {"<b>name</b>": "Ada", "nested": {"<img src=x onerror=alert(1)>id": 7}}
    status, _ = await post_json(client, gateway.url + "/profile", document)
    assert status == 200
    async with client.post(gateway.url + "/profile", data={"<i>note</i>": "<b>hi</b>"}) as response:
        assert response.status == 200
    if keys:
        assert strict_json(upstream.requests[0].body) == {"name": "Ada", "nested": {"id": 7}}
        assert parse_qsl(upstream.requests[1].body.decode()) == [("note", "hi")]
    else:
        assert strict_json(upstream.requests[0].body) == document
        assert parse_qsl(upstream.requests[1].body.decode()) == [("<i>note</i>", "hi")]


@pytest.mark.parametrize("engine", ENGINES)
async def test_non_string_values_arrive_unchanged_in_the_original_key_order_with_a_correct_content_length(
    engine: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(sanitize_config(upstream.url, engine=engine))
    raw = (
        '{"zeta": 1, "alpha": "<b>x</b>", "yes": true, "no": false, "none": null, "big": 123456789012345678901234567890,'
        ' "neg": -7, "pi": 3.141592653589793, "tiny": 5e-324, "list": [3, "<i>y</i>", false, null, {"q": [[], {}]}],'
        ' "obj": {"m": 2, "a": [1.5, -0.0], "b": "é ✓ \\u2028"}}'
    ).encode()
    async with client.post(gateway.url + "/items", data=raw, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 200
    received = upstream.requests[0]
    assert received.body != raw  # it was rewritten
    assert int(received.headers["Content-Length"]) == len(received.body)
    assert "Transfer-Encoding" not in received.headers
    document = strict_json(received.body)  # valid JSON
    expected = json.loads(raw)
    expected["alpha"], expected["list"][1] = "x", "y"
    assert document == expected
    assert list(document) == list(expected) and list(document["obj"]) == ["m", "a", "b"]
    assert [type(value) for value in document.values()] == [type(value) for value in expected.values()]  # ints stay ints
    assert str(document["obj"]["a"][1]) == "-0.0"


async def test_a_chunked_body_that_is_rewritten_reaches_the_upstream_with_a_content_length(
    upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(sanitize_config(upstream.url))

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"bio": "<b>Ada</b>'
        yield b' Lovelace"}'

    async with client.post(gateway.url + "/profile", data=chunks(), headers={"Content-Type": "application/json"}) as response:
        assert response.status == 200
    received = upstream.requests[0]
    assert received.body == '{"bio":"Ada Lovelace"}'.encode()
    assert received.headers["Content-Length"] == str(len(received.body))
    assert "Transfer-Encoding" not in received.headers


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_body_without_markup_reaches_the_upstream_byte_for_byte(
    engine: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    """Spacing, number forms and escapes a re-serialization would change all arrive as sent."""
    gateway = await start_gateway(sanitize_config(upstream.url, engine=engine, query=True))
    raw = b'{ "name" :"Tom & Jerry",\n  "n": 1.50, "e": 1E3, "u": "caf\\u00e9", "math": "a < b, 5 > 3", "list" : [ ] }'
    async with client.post(gateway.url + "/items", data=raw, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 200
    form = b"name=Tom+%26+Jerry&math=a+%3C+b&empty=&u=caf%C3%A9"
    async with client.post(gateway.url + "/items", data=form, headers={"Content-Type": "application/x-www-form-urlencoded"}) as response:
        assert response.status == 200
    async with client.get(URL(gateway.url + "/items?q=a+%3C+b&x=%26", encoded=True)) as response:
        assert response.status == 200
    assert [r.body for r in upstream.requests[:2]] == [raw, form]
    assert [r.headers["Content-Length"] for r in upstream.requests[:2]] == [str(len(raw)), str(len(form))]
    assert upstream.requests[2].path == "/items?q=a+%3C+b&x=%26"


# -- mode: reject ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_reject_answers_422_naming_every_field_that_held_markup_and_forwards_nothing(
    engine: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(sanitize_config(upstream.url, engine=engine, mode="reject", query=True))
    document = {
        "user": {"bio": "<b>Ada</b>", "name": "Ada", "motto": "a < b & 5 > 3"},
        "items": [{"note": "fine"}, {"note": "<i>two</i>"}, {"note": "<!-- three -->"}],
        "tags": ["ok", "<script>alert(1)</script>"],
        "count": 3,
    }
    query = "?" + urlencode({"q": "<svg onload=alert(1)>", "page": "2", "sort": "price < 10"})
    async with client.post(URL(gateway.url + "/profile" + query, encoded=True), json=document) as response:
        problem = assert_problem(response.status, response.headers, await response.read(), 422)
    assert [error["field"] for error in problem["errors"]] == ["q", "user.bio", "items[1].note", "items[2].note", "tags[1]"]
    assert {error["rule"] for error in problem["errors"]} == {"markup"}

    form = [("name", "Ada"), ("bio", "<b>Ada</b>"), ("motto", "Tom & Jerry"), ("link", '<a href="javascript:x()">x</a>')]
    async with client.post(gateway.url + "/profile", data=form) as response:
        problem = assert_problem(response.status, response.headers, await response.read(), 422)
    assert [error["field"] for error in problem["errors"]] == ["bio", "link"]

    async with client.get(URL(gateway.url + "/search?" + urlencode({"q": "<b>x</b>"}), encoded=True)) as response:
        problem = assert_problem(response.status, response.headers, await response.read(), 422)
    assert [error["field"] for error in problem["errors"]] == ["q"]
    assert upstream.requests == []


@pytest.mark.parametrize("engine", ENGINES)
async def test_reject_refuses_every_corpus_vector_and_passes_text_without_markup(
    engine: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(sanitize_config(upstream.url, engine=engine, mode="reject"))
    vectors = [render(vector, n) for n, vector in enumerate(VECTORS)]
    status, body = await post_json(client, gateway.url + "/notes", {"cases": vectors})
    assert status == 422
    assert [error["field"] for error in json.loads(body)["errors"]] == [f"cases[{n}]" for n in range(len(vectors))]
    status, _ = await post_json(client, gateway.url + "/notes", {"cases": list(READABLE.values())})
    assert status == 200
    assert len(upstream.requests) == 1


# -- bleach's escape ---------------------------------------------------------------------------


async def test_bleach_escape_turns_markup_into_visible_text(upstream: Any, start_gateway: Any, client: aiohttp.ClientSession) -> None:
    gateway = await start_gateway(sanitize_config(upstream.url, engine="bleach", escape=True))
    document = {"bio": "<b>Ada</b> & <script>alert(1)</script><!-- note -->", "plain": "Tom & Jerry"}
    status, _ = await post_json(client, gateway.url + "/profile", document)
    assert status == 200
    assert strict_json(upstream.requests[0].body) == {
        "bio": "&lt;b&gt;Ada&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;",  # the comment is still removed
        "plain": "Tom &amp; Jerry",
    }


def test_escape_with_nh3_is_a_config_error_naming_the_route_and_the_fix() -> None:
    config = sanitize_config("http://127.0.0.1:9", escape=True)
    with pytest.raises(ConfigError) as raised:
        parse_config(config)
    assert [str(issue) for issue in raised.value.issues] == ["routes[0].sanitize: escape needs engine: bleach (nh3 always drops markup)"]
    config["routes"][0]["sanitize"]["engine"] = "bleach"
    parse_config(config)  # the fix it names is accepted


# -- where the two engines differ --------------------------------------------------------------

RICH = {"allowed_tags": ["a", "b", "p"], "allowed_attributes": {"a": ["href", "title"]}}
# (what differs, settings, input, what nh3 makes of it, what bleach makes of it)
DIFFERENCES = [
    (
        "noscript is raw text to nh3 (a browser with script), markup to bleach's html5lib (without)",
        {},
        '<noscript><p title="</noscript><img src=x onerror=alert(1)>"></noscript>',
        '">',
        "",
    ),
    (
        "an end tag p inside svg leaves the svg for nh3, as in browsers; bleach's html5lib stays inside",
        {},
        '<svg></p><style><a id="</style><img src=1 onerror=alert(1)>">',
        '">',
        "",
    ),
    (
        "bleach's html5lib still expands the obsolete isindex element into its prompt text",
        {},
        "<isindex type=image src=1 onerror=alert(1)>",
        "",
        "\nThis is a searchable index. Enter search keywords: \n",
    ),
    ("bleach puts a newline where it strips a block element", {}, "<p>first</p><p>second</p>", "firstsecond", "first\nsecond"),
    ("nh3 writes a no-break space as &nbsp; in HTML output, bleach as the character", {"output": "html"}, "a\u00a0b<br>", "a&nbsp;b", "a\u00a0b"),
    (
        "nh3 escapes > and quotes inside attribute values, bleach leaves > and picks the other quote",
        RICH,
        "<a title='1 > 0 \"q\"' href=\"https://example.com/\">x</a>",
        '<a title="1 &gt; 0 &quot;q&quot;" href="https://example.com/">x</a>',
        "<a title='1 > 0 \"q\"' href=\"https://example.com/\">x</a>",
    ),
]


@pytest.mark.parametrize(("difference", "settings", "value", "nh3_output", "bleach_output"), DIFFERENCES, ids=[d[0] for d in DIFFERENCES])
async def test_where_the_engines_differ_both_outputs_are_pinned(
    difference: str, settings: dict[str, Any], value: str, nh3_output: str, bleach_output: str, upstream: Any, start_gateway: Any, client: aiohttp.ClientSession
) -> None:
    config = base_config(upstream.url)
    config["routes"] = [
        {"name": engine, "match": {"path": f"/{engine}"}, "upstream": "api", "sanitize": {"mode": "strip", "engine": engine, **settings}} for engine in ENGINES
    ]
    gateway = await start_gateway(config)
    for engine in ENGINES:
        status, _ = await post_json(client, f"{gateway.url}/{engine}/notes", {"value": value})
        assert status == 200
    outputs = [strict_json(received.body)["value"] for received in upstream.requests]
    assert outputs == [nh3_output, bleach_output]
    assert nh3_output != bleach_output
    assert all(not script_capable(output, {"a": {"href", "title"}, "b": set(), "p": set()}) for output in outputs)
