"""A real browser through the gateway: the CSP blocks inline script, CORS decides cross-origin reads.

Debian's chromium, driven by the playwright package (never `playwright install`). The page is
served by the upstream through the gateway at http://127.0.0.1:PORT; the API is fetched from
http://localhost:PORT, the same gateway under another origin.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import pytest
from aiohttp import web
from playwright.async_api import Browser, async_playwright

from gateway.policies.cors import CorsPolicy
from gateway.policies.headers import SecurityHeadersPolicy
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, base_config


PAGE = """<!doctype html>
<html><head><title>shop</title>
<script src="/page/app.js"></script>
<script>window.results.inlineRan = true;</script>
</head><body><p id="state">loading</p></body></html>
"""

# Runs first (a same-origin script, allowed by script-src 'self'); records CSP violations, then
# reads the API from the other origin: once from a route that allows this page's origin (with a
# custom header, so the browser sends a preflight), once from a route that does not.
APP_JS = """
window.results = {sameOriginRan: true, inlineRan: false, violations: []};
document.addEventListener("securitypolicyviolation", (e) => results.violations.push(e.violatedDirective));
async function read(url) {
  try {
    const response = await fetch(url, {headers: {"X-Trace": "1"}});
    return {status: response.status, body: await response.json()};
  } catch (error) {
    return {blocked: String(error)};
  }
}
window.addEventListener("load", async () => {
  results.allowed = await read(API + "/api/allowed");
  results.denied = await read(API + "/api/denied");
  document.body.dataset.done = "yes";
});
"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


def site_config(upstream_url: str, page_origin: str) -> dict[str, Any]:
    config = base_config(upstream_url)
    api_origin = page_origin.replace("127.0.0.1", "localhost")
    config["defaults"] = {"security_headers": {"preset": "helmet"}}
    config["routes"] = [
        {
            "name": "page",
            "match": {"path": "/page"},
            "upstream": "api",
            # helmet's CSP, plus the API origin for fetch; upgrade-insecure-requests would turn
            # the plain-HTTP test origins into https.
            "security_headers": {"csp": {"directives": {"connect-src": ["'self'", api_origin], "upgrade-insecure-requests": False}}},
        },
        {
            "name": "allowed",
            "match": {"path": "/api/allowed", "methods": ["GET"]},
            "upstream": "api",
            "cors": {"origins": [page_origin], "methods": ["GET"], "headers": ["X-Trace"]},
        },
        {
            "name": "denied",
            "match": {"path": "/api/denied", "methods": ["GET"]},
            "upstream": "api",
            "cors": {"origins": ["https://shop.example"], "methods": ["GET"], "headers": ["X-Trace"]},
        },
    ]
    return config


async def test_a_browser_enforces_the_gateways_csp_and_cors(upstream, start_gateway, browser: Browser) -> None:
    async def site(request: web.Request) -> web.Response:
        if request.path == "/page":
            return web.Response(text=PAGE, content_type="text/html")
        if request.path == "/page/app.js":
            # The gateway's port, as the browser used it (the upstream's own Host is its port).
            api = f"http://localhost:{request.headers['X-Forwarded-Host'].rsplit(':', 1)[1]}"
            return web.Response(text=f"const API = {json.dumps(api)};\n{APP_JS}", content_type="text/javascript")
        return web.json_response({"secret": request.path})

    upstream.handler = site
    gateway = await start_gateway(base_config(upstream.url), policies=(CorsPolicy, SecurityHeadersPolicy))
    page_origin = gateway.url  # http://127.0.0.1:PORT
    # The port is known only once the gateway listens: reload the routes that name the origins.
    config = site_config(upstream.url, page_origin)
    config["listen"]["port"] = gateway.port
    gateway.gateway.config_path.write_text(json.dumps(config))  # type: ignore[union-attr]
    assert await gateway.gateway.reload()

    page = await browser.new_page()
    await page.goto(page_origin + "/page")
    # (wait_for_function would evaluate a string, which this very CSP forbids)
    await page.wait_for_selector("body[data-done]", state="attached", timeout=15000)
    results = await page.evaluate("window.results")

    assert results["sameOriginRan"] is True
    assert results["inlineRan"] is False  # blocked by script-src 'self'
    assert "script-src-elem" in results["violations"] or "script-src" in results["violations"]
    assert results["allowed"] == {"status": 200, "body": {"secret": "/api/allowed"}}
    assert "blocked" in results["denied"]  # the browser refused to hand the response to the page
    paths = [(r.method, r.path) for r in upstream.requests]
    assert ("OPTIONS", "/api/allowed") not in paths  # the gateway answered the preflights itself
    assert ("OPTIONS", "/api/denied") not in paths
    assert ("GET", "/api/denied") not in paths  # refused at the preflight: never forwarded
