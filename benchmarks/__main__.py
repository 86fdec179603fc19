"""The gateway against the upstream alone, nginx and the Node stack, profile by profile.

    python -m benchmarks [--quick] [--seconds 3] [--rounds 3] [--warmup 1] [--connections 32]
                         [--profiles passthrough,api,post,flood,cache] [--targets direct,gateway,nginx,node]
                         [--no-node] [--no-chart] [--keep]

Everything runs on loopback, bounded in time and request count, and is started (and stopped) here:
a redis-server on a free port; the upstream (nginx serving a static 1 KB JSON when installed, else
a bare asyncio server); a JWKS endpoint (aiohttp) for RS256 tokens minted at start; one gateway
(``python -m gateway run``) per profile and row; and, when installed, the reference proxies: nginx
(proxy_pass with keep-alive, helmet's headers, ``limit_req``, ``proxy_cache``, an access log) and
the Node stack (benchmarks/node: express, helmet, express-rate-limit + rate-limit-redis,
http-proxy-middleware, jose, sanitize-html, validator, prom-client; installed by npm into a
scratch folder under ~/.cache/gateway-benchmarks, reused while package.json is unchanged).

Profiles (benchmarks/profiles.py): GET 1 KB passthrough; GET with a real API route's policies
(helmet + CDN headers, RS256 JWT via JWKS, two Redis-backed limits, metrics, access log); POST
4 KB JSON with sanitize + validate; a flood from one client over its 10/min limit; a GET 1 KB
cache hit, with the gateway on its Redis store, on its memory store and proxied on the same route
without the cache, against nginx's proxy_cache (the Node stack has no cache and sits it out).
The checks before load make each cache's one miss; every run counts the requests that reached
the upstream (its stub_status), which for a cache hit must stay at 0.

Load: wrk when installed (else the bundled aiohttp generator, which saturates much sooner); with
taskset, the load generator, the upstream, Redis and the JWKS server share half the cores and the
proxy under test gets the other half (the upstream moves there for the direct rows). Per profile:
a warm-up of every target, then rounds that alternate the targets (A B C D, A B C D, ...).

Per run: req/s, p50/p99 latency, statuses, CPU µs per request and busy share of the server's
processes (/proc), their memory (RSS), Redis commands and round trips per request (INFO before
and after), and requests that reached the upstream. The table gives medians with min–max over
the rounds and the gateway's ratios to direct, nginx and node (cache: to nginx's hit and to the
proxied route) within each round, and to nginx proxy_pass (the passthrough profile's nginx row of
the same round: the unit the benchmarks issue sets its targets in; run passthrough with nginx to
get it). A ratio over its target is listed under findings. Every run goes to
benchmarks/results/profiles-<timestamp>.json, the chart to the .png beside it (needs matplotlib).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from benchmarks import profiles as P
from benchmarks.common import (
    NGINX,
    ROOT,
    Processes,
    core_times,
    cpu_plan,
    elapsed,
    free_port,
    interrupt,
    load_environment,
    load_tool,
    memory,
    move_to_cores,
    new_report,
    nginx_errors,
    redis_change,
    redis_snapshot,
    rotation_files,
    run_load,
    say,
    spread,
    statuses_text,
    summed_counts,
    tear_down,
    tree_cpu_seconds,
    version,
    wait_for_port,
)

RESULTS = Path(__file__).resolve().parent / "results"
NODE_SOURCE = Path(__file__).resolve().parent / "node"
NODE_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gateway-benchmarks"



def request(method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request for the checks before load (not load)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:  # noqa: S310 - loopback only
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# ---------------------------------------------------------------------------------------------
# The Node stack
# ---------------------------------------------------------------------------------------------


def node_folder() -> tuple[Path | None, str]:
    """The scratch folder with the Node stack installed (npm, once per package.json): (folder, note)."""
    if not shutil.which("node") or not shutil.which("npm"):
        return None, "node or npm is not installed"
    package = (NODE_SOURCE / "package.json").read_bytes()
    digest = hashlib.sha256(package + version(["node", "--version"]).encode()).hexdigest()[:12]
    folder = NODE_CACHE / f"node-{digest}"
    marker = folder / ".installed"
    note = f"reused {folder}"
    if not marker.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_bytes(package)
        say(f"npm install into {folder} (once per package.json)…")
        try:
            done = subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--no-package-lock", "--omit=dev", "--loglevel=error"],
                cwd=folder, capture_output=True, text=True, timeout=300, check=False,
            )
        except subprocess.TimeoutExpired:
            return None, "npm install took over 300 s"
        if done.returncode != 0:
            return None, f"npm install failed ({done.returncode}): {(done.stderr or done.stdout)[-500:]}"
        marker.write_text(datetime.now().isoformat())
        note = f"installed into {folder}"
    shutil.copyfile(NODE_SOURCE / "server.js", folder / "server.js")
    return folder, note


def node_versions(folder: Path) -> dict[str, str]:
    out = {"node": version(["node", "--version"])}
    for name in json.loads((NODE_SOURCE / "package.json").read_text())["dependencies"]:
        try:
            out[name] = json.loads((folder / "node_modules" / name / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            out[name] = "?"
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def start_gateways(
    processes: Processes, chosen: list[str], scratch: Path, cores: list[int] | None, configs: dict[str, Any], *,
    upstream_port: int, redis_port: int, jwks_url: str,
) -> dict[str, dict[str, Any]]:
    """One gateway per profile and row (``gateway`` and the profile's ``gateway_rows``), listening:
    {row: {"processes": {profile: process}, "ports": {profile: port}, "admin_ports": {profile: port}}}."""
    servers: dict[str, dict[str, Any]] = {}
    for key in chosen:
        for row in ("gateway", *P.PROFILES[key].gateway_rows):
            port, admin_port = free_port(), free_port() if key == "api" else None
            config = P.gateway_config(key, port, upstream_port, redis_port, jwks_url, admin_port, row)
            name = f"{row}-{key}"
            path = scratch / f"{name}.yaml"
            path.write_text(json.dumps(config, indent=2))  # JSON is YAML
            configs[name.replace("-", "_")] = config
            server = servers.setdefault(row, {"processes": {}, "ports": {}, "admin_ports": {}})
            server["processes"][key] = processes.start(name, [sys.executable, "-m", "gateway", "run", "-c", str(path)], cores, cwd=ROOT)
            server["ports"][key] = port
            if admin_port:
                server["admin_ports"][key] = admin_port
    for row, server in servers.items():
        for key, process in server["processes"].items():
            wait_for_port(server["ports"][key], process, processes, f"{row}-{key}")
    return servers


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_cores, server_cores = cpu_plan()
    scratch = Path(tempfile.mkdtemp(prefix="bench-profiles-"))
    scratch.chmod(0o755)  # nginx's workers (nobody, when started as root) read files in here
    processes = Processes(scratch)
    chosen = list(args.profiles)
    environment = {
        **load_environment(load_cores),
        "server_cores": server_cores,
        "redis_server": version(["redis-server", "--version"]),
        "nginx": version([NGINX, "-v"]) if os.path.exists(NGINX) else None,
    }
    report = new_report(
        "profiles", args, environment,
        profiles={key: {"title": P.PROFILES[key].title, "method": P.PROFILES[key].method, "path": P.PROFILES[key].path, "does": P.PROFILES[key].does} for key in chosen},
        left_out=[f"{key}: no {target} row ({why})" for key in chosen for target, why in P.PROFILES[key].left_out.items() if target in args.targets],
        skipped={}, configs={}, checks={}, runs=[],
    )  # fmt: skip
    findings: list[str] = report["findings"]
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        say(
            f"scratch {scratch}; load: {load_tool()}; cores: load/upstream/redis {load_cores or 'unpinned'}, "
            f"proxy under test {server_cores or 'unpinned'}"
        )
        # Redis, the upstream, the JWKS endpoint: on the load cores.
        redis_port = free_port()
        redis_server = processes.start(
            "redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(scratch)], load_cores
        )
        wait_for_port(redis_port, redis_server, processes, "redis")
        client = redis.Redis(port=redis_port, socket_timeout=5)
        client.ping()

        upstream, upstream_port, upstream_kind = P.start_upstream(processes, scratch, load_cores, report, nginx=not args.no_nginx_upstream)
        if not os.path.exists(NGINX):
            report["skipped"]["nginx"] = "nginx is not installed (apt-get install nginx-light)"

        jwks, tokens = P.mint()
        jwks_file = scratch / "jwks.json"
        jwks_file.write_text(json.dumps(jwks))
        jwks_port = free_port()
        jwks_server = processes.start("jwks", [sys.executable, "-m", "benchmarks.profiles", "jwks", str(jwks_port), str(jwks_file)], load_cores, cwd=ROOT)
        wait_for_port(jwks_port, jwks_server, processes, "jwks")
        jwks_url = f"http://127.0.0.1:{jwks_port}/jwks.json"
        say(f"redis :{redis_port}, upstream ({upstream_kind}) :{upstream_port}, jwks :{jwks_port}, {len(tokens)} RS256 tokens")

        # The proxies under test: on the server cores.
        servers: dict[str, dict[str, Any]] = {"direct": {"process": upstream, "ports": dict.fromkeys(chosen, upstream_port)}}
        if "gateway" in args.targets:
            servers.update(start_gateways(processes, chosen, scratch, server_cores, report["configs"], upstream_port=upstream_port, redis_port=redis_port, jwks_url=jwks_url))
        if "nginx" in args.targets and os.path.exists(NGINX):
            port = free_port()
            config = P.nginx_reference_config(scratch, port, upstream_port)
            report["configs"]["nginx_proxy"] = config.read_text()
            process = processes.start("nginx-proxy", [NGINX, "-c", str(config), "-p", str(scratch), "-e", str(scratch / "nginx-proxy-error.log"), "-g", "daemon off;"], server_cores)
            wait_for_port(port, process, processes, "nginx-proxy")
            servers["nginx"] = {"process": process, "ports": dict.fromkeys(chosen, port)}
        if "node" in args.targets:
            folder, note = (None, "--no-node") if args.no_node else node_folder()
            if folder is None:
                report["skipped"]["node"] = note
                say(f"node stack skipped: {note}")
            else:
                report["environment"]["node_stack"] = {"folder": str(folder), "note": note, "versions": node_versions(folder)}
                port = free_port()
                env = {
                    **os.environ, "NODE_ENV": "production", "PORT": str(port), "UPSTREAM": f"http://127.0.0.1:{upstream_port}",
                    "REDIS_URL": f"redis://127.0.0.1:{redis_port}", "JWKS_URL": jwks_url, "ISSUER": P.ISSUER, "AUDIENCE": P.AUDIENCE,
                    "HIGH": str(P.HIGH), "FLOOD_LIMIT": str(P.FLOOD_LIMIT), "FLOOD_WINDOW_MS": "60000",
                }
                process = processes.start("node", ["node", str(folder / "server.js")], server_cores, cwd=folder, env=env)
                wait_for_port(port, process, processes, "node", timeout=30)
                servers["node"] = {"process": process, "ports": dict.fromkeys(chosen, port)}
                say(f"node stack: {note}")
        targets = [row for target in P.TARGETS if target in args.targets for row in servers if row.partition("-")[0] == target]
        report["targets"] = targets
        for target in args.targets:
            if target not in servers and target not in report["skipped"]:
                report["skipped"][target] = "not started"

        def rows(key: str) -> list[str]:
            """The rows of a profile: the targets it has a port on, but those it leaves out."""
            return [row for row in targets if key in servers[row]["ports"] and row not in P.PROFILES[key].left_out]

        def url(target: str, key: str) -> str:
            return f"http://127.0.0.1:{servers[target]['ports'][key]}{P.PROFILES[key].path}"

        def pid(target: str, key: str) -> int:
            server = servers[target]
            return server["processes"][key].pid if "processes" in server else server["process"].pid

        # What each profile sends.
        body_bytes, rotation = P.post_bodies()
        body_files = {}
        for name, raw in body_bytes.items():
            body_files[name] = scratch / f"body-{name}.json"
            body_files[name].write_bytes(raw)
            body_files[name].chmod(0o644)
        loads: dict[str, tuple[Path | None, Path | None]] = dict.fromkeys(P.PROFILES, (None, None))
        loads["api"] = rotation_files(scratch, "load-api", P.PROFILES["api"].path, [{"headers": {"Authorization": f"Bearer {t}"}} for t in tokens])
        loads["post"] = rotation_files(
            scratch, "load-post", P.PROFILES["post"].path,
            [{"method": "POST", "headers": {"Content-Type": "application/json"}, "body_file": body_files[name]} for name in rotation],
        )

        # Checks: one request (or a few) per profile and target before any load.
        for key in chosen:
            for target in rows(key):
                before = len(findings)
                entry = check_target(key, target, url(target, key), tokens, body_bytes, findings)
                report["checks"][f"{key}/{target}"] = entry
                say(f"check {key:<11} {target:<15}: {entry['summary']}" + ("" if len(findings) == before else f" — {len(findings) - before} problem(s), see findings"))

        def upstream_served() -> int:
            """Requests the upstream has served, this one included (stub_status)."""
            return P.served_requests(request("GET", f"http://127.0.0.1:{upstream_port}{P.UPSTREAM_STATUS}")[2])

        def measure(key: str, target: str, phase: str, round_: int | None, seconds: float) -> dict[str, Any]:
            server_pid = pid(target, key)
            if target == "direct":
                move_to_cores(upstream.pid, server_cores)
            try:
                script, spec = loads[key]
                counters = redis_snapshot(client)
                served = upstream_served()
                window = time.monotonic()
                before = {"server": tree_cpu_seconds(server_pid), "redis": tree_cpu_seconds(redis_server.pid), "core": core_times(server_cores), "load": core_times(load_cores)}
                result = run_load(processes, url(target, key), seconds, args.connections, load_cores, name="load", script=script, spec=spec)
                after = {"server": tree_cpu_seconds(server_pid), "redis": tree_cpu_seconds(redis_server.pid), "core": core_times(server_cores), "load": core_times(load_cores)}
                window = time.monotonic() - window
                time.sleep(0.2)  # requests in flight when the load stopped reach Redis
                change = redis_change(counters, redis_snapshot(client))
                upstream_requests = upstream_served() - served - 1
                mem = memory(server_pid)
            finally:
                if target == "direct":
                    move_to_cores(upstream.pid, load_cores)
            duration = result["duration_us"] / 1e6 if result["duration_us"] else 0.0
            requests = result["requests"]
            server_cpu = after["server"] - before["server"]
            core_busy = after["core"]["busy"] - before["core"]["busy"]
            softirq = after["core"]["softirq"] - before["core"]["softirq"]
            n_server = len(server_cores) if server_cores else os.cpu_count() or 1
            n_load = len(load_cores) if load_cores else os.cpu_count() or 1
            entry = {
                "profile": key, "target": target, "phase": phase, "round": round_, "ended": time.time(), **result,
                "window_s": window,
                "server_cpu_s": server_cpu, "redis_cpu_s": after["redis"] - before["redis"],
                "server_busy": server_cpu / duration if duration else None,
                # Shares of the server's core(s) over the whole window (load tool start and stop included):
                # the kernel's softirq work (loopback networking, charged to no process), and what
                # other processes used (anything on the machine besides the server; unpinned: all cores).
                "softirq_busy": softirq / window / n_server,
                "foreign_busy": max(core_busy - softirq - server_cpu, 0.0) / window / n_server,
                "load_core_busy": (after["load"]["busy"] - before["load"]["busy"]) / window / n_load,
                "cpu_us_per_request": server_cpu / requests * 1e6 if requests else None,
                "redis_cpu_us_per_request": (after["redis"] - before["redis"]) / requests * 1e6 if requests else None,
                **mem,
                "redis_commands": change["commands"], "redis_total": change["total"], "redis_round_trips": change["reads"],
                "redis_evalsha": change["commands"].get("evalsha", 0) + change["commands"].get("eval", 0),
                "redis_commands_per_request": change["total"] / requests if requests else None,
                "redis_round_trips_per_request": change["reads"] / requests if requests else None,
                "upstream_requests": upstream_requests,
                "loadavg": Path("/proc/loadavg").read_text().split()[0],
            }
            report["runs"].append(entry)
            lat = result["latency_us"]
            errors = {k: v for k, v in result["errors"].items() if v and k != "status"}
            say(
                f"{phase}{'' if round_ is None else f' {round_}/{args.rounds}'} {key:<11} {target:<15}: {result['rps']:>8,.0f} req/s, "
                f"p50 {lat['p50'] / 1000:.2f} ms, p99 {lat['p99'] / 1000:.2f} ms, {entry['cpu_us_per_request'] or 0:.0f} CPU µs/req "
                f"(busy {entry['server_busy'] or 0:.0%}; its core: softirq {entry['softirq_busy']:.0%}, others {entry['foreign_busy']:.0%}; load core {entry['load_core_busy']:.0%}), "
                f"RSS {mem['rss_bytes'] / 2**20:.0f} MB, redis {entry['redis_commands_per_request'] or 0:.2f} cmd/req, upstream {upstream_requests:,} requests, "
                f"statuses {statuses_text(result['statuses'])}"
                + (f", socket errors {errors}" if errors else "")
            )
            return entry

        failed: set[str] = set()  # targets whose server stopped answering: left out from then on

        def measure_or_note(key: str, target: str, phase: str, round_: int | None, seconds: float) -> None:
            if target in failed:
                return
            try:
                measure(key, target, phase, round_, seconds)
            except RuntimeError as exc:  # the load generator could not reach the server
                failed.add(target)
                report["findings"].append(f"{key}/{target}: {str(exc).splitlines()[-1]} — {target} left out of the rest of the run")
                say(f"{key} {target}: {str(exc).splitlines()[-1]}; {target} is left out of the rest of the run")

        for key in chosen:
            say(f"profile {key}: {P.PROFILES[key].title}")
            for target in rows(key):
                measure_or_note(key, target, "warmup", None, args.warmup)
            for round_ in range(1, args.rounds + 1):
                for target in rows(key):
                    measure_or_note(key, target, "round", round_, args.seconds)

        # Metrics the gateway and node recorded for the api profile (the policy is on, and counts).
        if "api" in chosen:
            report["metrics_scrapes"] = scrape_metrics(servers, url)
        gateway_logs = {row: [f"{row}-{key}" for key in servers[row]["processes"]] for row in targets if row.startswith("gateway")}
        for target in targets:
            report["findings"] += log_findings(target, processes, scratch, gateway_logs.get(target, []))
        report["logs_tail"] = {name: processes.log_text(name)[-3000:] for name in ("redis", "jwks", "node", *(n for names in gateway_logs.values() for n in names))}
    finally:
        tear_down(previous_term, processes, scratch, args.keep, report["findings"])
    report["summary"] = summarise(report)
    report["findings"] += check(report)
    return report



# ---------------------------------------------------------------------------------------------
# Checks before load
# ---------------------------------------------------------------------------------------------


def check_target(key: str, target: str, url: str, tokens: list[str], body_bytes: dict[str, bytes], findings: list[str]) -> dict[str, Any]:
    """What one request through ``target`` gets on profile ``key``; problems go to ``findings``."""
    where = f"check {key}/{target}"
    entry: dict[str, Any] = {}
    if key == "passthrough":
        status, headers, body = request("GET", url)
        entry.update(status=status, bytes=len(body), headers=headers, summary=f"{status}, {len(body)} B")
        if status != 200 or len(body) != 1024:
            findings.append(f"{where}: {status} with {len(body)} bytes (expected 200 with 1024)")
    elif key == "api":
        status, headers, body = request("GET", url, {"Authorization": f"Bearer {tokens[0]}"})
        lower = {k.lower(): v for k, v in headers.items()}
        helmet = P.helmet_headers()
        missing = [name for name in helmet if name.lower() not in lower]
        anonymous, _, _ = request("GET", url)
        entry.update(
            status=status, headers=headers, missing_helmet_headers=missing, anonymous_status=anonymous,
            rate_limit_header=lower.get("ratelimit") or lower.get("ratelimit-remaining"), cache_control=lower.get("cache-control"), server=lower.get("server"),
        )
        entry["summary"] = (
            f"{status}, {len(helmet) - len(missing)}/{len(helmet)} helmet headers, Cache-Control {lower.get('cache-control')!r}, "
            f"RateLimit {'yes' if entry['rate_limit_header'] else 'no'}, no token → {anonymous}"
        )
        if status != 200:
            findings.append(f"{where}: a valid token got {status}: {body[:200]!r}")
        if target != "direct":
            if missing:
                findings.append(f"{where}: helmet headers missing: {missing}")
            # nginx always sends its own "Server: nginx" (server_tokens off drops the version;
            # removing it needs the headers-more module); the upstream's is hidden.
            if "server" in lower and target != "nginx":
                findings.append(f"{where}: a Server header came through ({lower['server']!r})")
        if target in ("gateway", "node"):
            if anonymous != 401:
                findings.append(f"{where}: a request without a token got {anonymous}, not 401")
            if not entry["rate_limit_header"]:
                findings.append(f"{where}: no RateLimit header on a limited route")
    elif key == "post":
        statuses = {}
        for variant, raw in body_bytes.items():
            status, _, answer = request("POST", url, {"Content-Type": "application/json"}, raw)
            found = re.search(rb'"len":"(\d*)"', answer)
            arrived = int(found.group(1)) if found and found.group(1) else None
            statuses[variant] = {"status": status, "sent": len(raw), "upstream_received": arrived}
            if status != 200 or arrived is None:
                findings.append(f"{where} {variant}: {status} {answer[:200]!r}")
            elif variant == "clean" and target == "gateway" and arrived != len(raw):
                findings.append(f"{where}: a clean body reached the upstream as {arrived} bytes, sent {len(raw)} (the gateway forwards unchanged bodies byte for byte)")
            elif variant == "markup" and target in ("gateway", "node") and arrived == len(raw):
                findings.append(f"{where}: the markup body reached the upstream unchanged ({arrived} bytes)")
        bad = json.loads(body_bytes["clean"])
        bad["seller"]["email"] = "orders at hollowpine"
        invalid, _, _ = request("POST", url, {"Content-Type": "application/json"}, json.dumps(bad).encode())
        statuses["invalid_email"] = {"status": invalid}
        if target in ("gateway", "node") and invalid != 422:
            findings.append(f"{where}: a body with an invalid email got {invalid}, not 422")
        entry.update(bodies=statuses)
        entry["summary"] = (
            f"clean {statuses['clean']['status']} ({statuses['clean']['upstream_received']} B upstream), "
            f"markup {statuses['markup']['status']} ({statuses['markup']['sent']} B sent → {statuses['markup']['upstream_received']} B upstream), invalid email → {invalid}"
        )
    elif key == "flood":
        status, headers, body = request("GET", url)
        entry.update(status=status, headers=headers, summary=f"{status} (the first request of the client)")
        if status != 200:
            findings.append(f"{where}: the client's first request got {status}")
    elif key == "cache":
        entry.update(check_cache(where, target in P.PROFILES[key].cached, url, findings))
    return entry


def check_cache(where: str, cached: bool, url: str, findings: list[str]) -> dict[str, Any]:
    """Two GETs: the first makes the row's one miss, the second must be a hit where the row caches."""
    responses = []
    for _ in range(2):
        status, headers, body = request("GET", url)
        lower = {k.lower(): v for k, v in headers.items()}
        responses.append({"status": status, "bytes": len(body), "cache_status": lower.get("cache-status") or lower.get("x-cache-status"), "age": lower.get("age")})
        if status != 200 or len(body) != 1024:
            findings.append(f"{where}: {status} with {len(body)} bytes (expected 200 with 1024)")
    seen = responses[1]["cache_status"]
    if cached and not is_hit(seen):
        findings.append(f"{where}: the second request was not a hit (cache status {seen!r})")
    if not cached and seen:
        findings.append(f"{where}: a row without a cache answered with a cache status {seen!r}")
    summary = " then ".join(f"{r['status']} {r['bytes']} B {r['cache_status'] or 'no cache status'!r}" for r in responses)
    return {"responses": responses, "summary": summary}


def is_hit(cache_status: str | None) -> bool:
    """RFC 9211 ``Cache-Status: gateway; hit; ttl=59`` or nginx's ``X-Cache-Status: HIT``."""
    return cache_status is not None and "hit" in (part.strip().lower() for part in cache_status.split(";"))


def scrape_metrics(servers: dict[str, Any], url: Any) -> dict[str, Any]:
    """Requests counted by the api profile's metrics (gateway: admin /metrics; node: /metrics)."""
    out: dict[str, Any] = {}
    sources = {}
    admin = servers.get("gateway", {}).get("admin_ports", {}).get("api")
    if admin:
        sources["gateway"] = f"http://127.0.0.1:{admin}/metrics"
    if "node" in servers:
        sources["node"] = f"http://127.0.0.1:{servers['node']['ports']['api']}/metrics"
    for target, address in sources.items():
        try:
            status, _, body = request("GET", address)
        except OSError as exc:
            out[target] = {"error": str(exc)}
            continue
        counts = [float(m.group(1)) for m in re.finditer(rb'^http_request_duration_seconds_count\{[^}]*route="api"[^}]*\} ([0-9.e+]+)$', body, re.MULTILINE)]
        out[target] = {"status": status, "requests_counted": int(sum(counts))}
    return out


def log_findings(target: str, processes: Processes, scratch: Path, gateway_logs: list[str]) -> list[str]:
    """Warnings and errors in the logs of ``target``'s processes (a gateway row: ``gateway_logs``), grouped and counted."""
    out = []
    if target.startswith("gateway"):
        for name in gateway_logs:
            groups: dict[str, int] = {}
            for line in processes.log_text(name).splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    record = {"level": "?", "message": line}
                if not isinstance(record, dict) or ("level" not in record and "request_id" in record and "status" in record):
                    continue  # an access log line
                level = str(record.get("level", "?"))
                if level not in ("warning", "error", "critical", "?") and "traceback" not in line.lower():
                    continue
                head, _, trace = str(record.get("message", "")).partition("\n")
                exception = trace.strip().splitlines()[-1] if trace.strip() else ""
                what = f"{level} {head[:160]!r}" + (f" ({exception[:160]})" if exception else "")
                groups[what] = groups.get(what, 0) + 1
            out += [f"{name} log: {n}x {what}" for what, n in groups.items()]
    elif target == "node":
        groups = {}
        for line in processes.log_text("node").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"level": "?", "message": line}
            if not isinstance(record, dict) or "route" in record or record.get("level") == "info":
                continue  # access log lines, the "listening" line
            what = f"{record.get('level', '?')} {str(record.get('message', ''))[:200]!r}"
            groups[what] = groups.get(what, 0) + 1
        out += [f"node log: {n}x {what}" for what, n in groups.items()]
    elif target in ("nginx", "direct"):
        name = "nginx-proxy-error.log" if target == "nginx" else "nginx-upstream-error.log"
        out += nginx_errors(scratch / name, ("warn", "error", "crit", "alert", "emerg"))
    return out


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    measured = [run for run in report["runs"] if run["phase"] == "round"]
    cells: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for key in report["profiles"]:
        for target in report.get("targets", []):
            mine = [run for run in measured if run["profile"] == key and run["target"] == target]
            every = [run for run in report["runs"] if run["profile"] == key and run["target"] == target]
            if not mine:
                continue
            requests = sum(run["requests"] for run in mine)
            statuses = summed_counts(run["statuses"] for run in mine)
            cells[f"{key}/{target}"] = {
                "profile": key, "target": target, "runs": len(mine), "requests": requests,
                "rps": spread([run["rps"] for run in mine]),
                "p50_ms": statistics.median(run["latency_us"]["p50"] for run in mine) / 1000,
                "p99_ms": statistics.median(run["latency_us"]["p99"] for run in mine) / 1000,
                "p99_ms_spread": spread([run["latency_us"]["p99"] / 1000 for run in mine]),
                "cpu_us_per_request": spread([run["cpu_us_per_request"] for run in mine if run["cpu_us_per_request"] is not None]),
                "server_busy": statistics.median(run["server_busy"] or 0 for run in mine),
                "load_core_busy": statistics.median(run["load_core_busy"] or 0 for run in mine),
                "foreign_busy": max(run["foreign_busy"] or 0 for run in mine),
                "softirq_busy": statistics.median(run["softirq_busy"] or 0 for run in mine),
                "rss_mb": statistics.median(run["rss_bytes"] for run in mine) / 2**20,
                "peak_rss_mb": max(run["peak_rss_bytes"] for run in every) / 2**20,
                "processes": max(run["processes"] for run in mine),
                "redis_commands_per_request": sum(run["redis_total"] for run in mine) / requests if requests else None,
                "redis_round_trips_per_request": sum(run["redis_round_trips"] for run in mine) / requests if requests else None,
                "redis_evalsha_per_request": sum(run["redis_evalsha"] for run in mine) / requests if requests else None,
                "redis_commands": summed_counts(run["redis_commands"] for run in mine),
                "upstream_requests": sum(run["upstream_requests"] for run in mine),
                "statuses": dict(sorted(statuses.items())),
                "statuses_all_runs": dict(sorted(summed_counts(run["statuses"] for run in every).items())),
                "socket_errors": {k: sum(run["errors"][k] for run in mine) for k in ("connect", "read", "write", "timeout")},
                "max_latency_ms": max(run["latency_us"]["max"] for run in mine) / 1000,
            }
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for run in measured:
            if run["profile"] == key:
                by_round.setdefault(run["round"], {})[run["target"]] = run
        comparisons = [(row, other, [(r[row], r[other]) for r in by_round.values() if row in r and other in r]) for row, other in P.PROFILES[key].ratios]
        if key != "passthrough":
            proxy_pass = {run["round"]: run for run in measured if run["profile"] == "passthrough" and run["target"] == "nginx"}
            for row in ("gateway", *P.PROFILES[key].gateway_rows):
                comparisons.append((row, P.PROXY_PASS, [(r[row], proxy_pass[n]) for n, r in by_round.items() if row in r and n in proxy_pass]))
        for row, other, pairs in comparisons:
            rps = [ours["rps"] / theirs["rps"] for ours, theirs in pairs if theirs["rps"]]
            cpu = [
                ours["cpu_us_per_request"] / theirs["cpu_us_per_request"]
                for ours, theirs in pairs if theirs["cpu_us_per_request"] and ours["cpu_us_per_request"] is not None
            ]
            p99 = [ours["latency_us"]["p99"] / theirs["latency_us"]["p99"] for ours, theirs in pairs if theirs["latency_us"]["p99"]]
            if rps:
                ratios.setdefault(key, {})[f"{row}/{other}"] = {
                    "rps": {"per_round": rps, **spread(rps)},
                    "cpu_us_per_request": {"per_round": cpu, **spread(cpu)},
                    "p99": {"per_round": p99, **spread(p99)},
                }
    return {"cells": cells, "ratios": ratios}


def check(report: dict[str, Any]) -> list[str]:
    """What does not look as it should, after the runs."""
    findings = []
    cells = report["summary"]["cells"]
    elapsed_minutes = 0.0
    flood_runs = [run for run in report["runs"] if run["profile"] == "flood"]
    if flood_runs:
        elapsed_minutes = (max(r["ended"] for r in flood_runs) - min(r["ended"] - r["duration_us"] / 1e6 for r in flood_runs)) / 60
    for name, cell in cells.items():
        key, target = cell["profile"], cell["target"]
        expected = P.PROFILES[key].expected if target != "direct" else {"200"}
        other = {code: n for code, n in cell["statuses"].items() if code not in expected}
        if other:
            findings.append(f"{name}: unexpected statuses {other} (of {cell['requests']:,} requests)")
        if any(cell["socket_errors"].values()):
            findings.append(f"{name}: socket errors {cell['socket_errors']}")
        if cell["max_latency_ms"] > 1000:
            findings.append(f"{name}: a request took {cell['max_latency_ms'] / 1000:.2f}s")
        if key == "flood" and target != "direct":
            allowed = cell["statuses_all_runs"].get("200", 0)
            # 10 per window; a fixed window may restart once or twice during the profile; nginx's leaky bucket adds one per 6 s.
            ceiling = P.FLOOD_LIMIT * (2 + int(elapsed_minutes)) + (int(elapsed_minutes * 10) + 1 if target == "nginx" else 0)
            if allowed > ceiling:
                findings.append(f"{name}: {allowed} requests allowed over {elapsed_minutes:.1f} min where {P.FLOOD_LIMIT}/min was set")
        upstream = cell["upstream_requests"]
        if target in P.PROFILES[key].cached and upstream:
            findings.append(f"{name}: {upstream:,} requests reached the upstream during the measured rounds (a hit must not touch it)")
        if target not in P.PROFILES[key].cached and upstream < cell["statuses"].get("200", 0):
            findings.append(f"{name}: the upstream counted {upstream:,} requests for {cell['statuses']['200']:,} answers of 200 (its counter misses some)")
        if target.startswith("gateway"):
            cmds = cell["redis_commands_per_request"] or 0
            trips = cell["redis_round_trips_per_request"] or 0
            # (A PING every few quiet seconds is the cache's pub/sub subscriber of another row's
            # gateway keeping its connection checked, whichever row is measured meanwhile.)
            if not P.uses_redis(key, target) and set(cell["redis_commands"]) - {"ping"}:
                findings.append(f"{name}: {cell['redis_commands']} Redis commands from a gateway with no redis block")
            if key == "api" and trips > 1.05:  # under load, concurrent decisions share one (a pipeline)
                findings.append(f"{name}: {trips:.3f} Redis round trips per request (the rule: at most one for all limits of a route)")
            if key == "flood" and trips > 0.01:
                findings.append(f"{name}: {trips:.3f} Redis round trips per request (a remembered denial should cost none); {cmds:.3f} commands")
    for key in report["profiles"]:
        p = P.PROFILES[key]
        bounds = dict(p.cpu_bounds)
        if p.proxy_pass_bound is not None:
            bounds["gateway/nginx" if key == "passthrough" else f"gateway/{P.PROXY_PASS}"] = p.proxy_pass_bound
        for name, bound in bounds.items():
            cpu = report["summary"]["ratios"].get(key, {}).get(name, {}).get("cpu_us_per_request", {})
            if cpu.get("median", 0) > bound:
                findings.append(f"{key} {name}: CPU µs/req {cpu['median']:.2f}x {fmt_range(cpu, '.2f')} over the bound of {bound:g}x")
    noisy = [run for run in report["runs"] if run["phase"] == "round" and (run["foreign_busy"] or 0) > 0.05]
    if noisy and report["environment"]["server_cores"]:
        worst = max(noisy, key=lambda run: run["foreign_busy"])
        findings.append(
            f"processes other than the one under test used its core during {len(noisy)} of "
            f"{sum(1 for run in report['runs'] if run['phase'] == 'round')} measured runs (worst: {worst['profile']}/{worst['target']} round "
            f"{worst['round']}, {worst['foreign_busy']:.0%} of the core, load average {worst['loadavg']}): figures are noisy; "
            "CPU µs/req is the steadiest figure"
        )
    bound = [
        name for name, cell in cells.items()
        if cell["target"] != "gateway" and cell["server_busy"] < 0.85 and cell["load_core_busy"] > 0.9
    ]
    if bound:
        findings.append(
            "limited by the load core (load generator + upstream + Redis share it), not by the proxy under test "
            f"(its core < 85% busy): {', '.join(bound)} — their req/s understate them, so compare CPU µs/req there"
        )
    scrapes = report.get("metrics_scrapes", {})
    for target, scrape in scrapes.items():
        sent = sum(run["requests"] for run in report["runs"] if run["profile"] == "api" and run["target"] == target)
        counted = scrape.get("requests_counted")
        if counted is None or counted < sent:
            findings.append(f"api/{target}: metrics counted {counted} requests, the load tool {sent:,}")
    return findings


def fmt_range(s: dict[str, float], digits: str) -> str:
    return f"({format(s['min'], digits)}–{format(s['max'], digits)})" if s else ""


def profile_lines(report: dict[str, Any], key: str) -> list[str]:
    """One profile's rows, its skipped and left-out targets, its ratios (and a cache's statuses)."""
    cells, ratios, env = report["summary"]["cells"], report["summary"]["ratios"], report["environment"]
    p = P.PROFILES[key]
    lines = [
        f"{p.title} — {p.method} {p.path}",
        (
            f"  {'target':<15} {'req/s':>8} {'(min–max)':>17} {'p50 ms':>7} {'p99 ms':>7} {'busy':>5} {'CPU µs/req':>10} {'RSS MB':>7} "
            f"{'redis cmd/req':>13} {'evalsha/req':>11} {'rt/req':>7} {'upstream':>9}  {'statuses':<18} what it runs"
        ),
    ]
    for target in report.get("targets", []):
        cell = cells.get(f"{key}/{target}")
        if not cell:
            continue
        rps, cpu = cell["rps"], cell["cpu_us_per_request"]
        does = f"{env.get('upstream')} (1 KB JSON; POST: echo)" if target == "direct" else p.does.get(target, "")
        lines.append(
            f"  {target:<15} {rps['median']:>8,.0f} {fmt_range(rps, ',.0f'):>17} {cell['p50_ms']:>7.2f} {cell['p99_ms']:>7.2f} {cell['server_busy']:>5.0%} "
            f"{cpu.get('median', 0):>10.1f} {cell['rss_mb']:>7.1f} {cell['redis_commands_per_request']:>13.3f} {cell['redis_evalsha_per_request']:>11.3f} "
            f"{cell['redis_round_trips_per_request']:>7.3f} {cell['upstream_requests']:>9,}  {statuses_text(cell['statuses']):<18} {does}"
        )
    skipped = {**report["skipped"], **{t: why for t, why in p.left_out.items() if t in report["args"]["targets"] and t not in report["skipped"]}}
    lines += [f"  {target:<15} skipped: {reason}" for target, reason in skipped.items()]
    for name, r in ratios.get(key, {}).items():
        lines.append(
            f"  {name:<30} req/s {r['rps']['median']:.2f} {fmt_range(r['rps'], '.2f'):<13} CPU µs/req {r['cpu_us_per_request'].get('median', float('nan')):.2f}x "
            f"{fmt_range(r['cpu_us_per_request'], '.2f'):<13} p99 {r['p99'].get('median', float('nan')):.2f}x"
        )
    seen = {
        target: " then ".join(repr(response["cache_status"]) for response in check["responses"])
        for target in report.get("targets", []) if (check := report["checks"].get(f"{key}/{target}", {})).get("responses")
    }
    if seen:
        lines.append("  cache status of two requests before load: " + "; ".join(f"{target} {statuses}" for target, statuses in seen.items()))
    return lines


def table(report: dict[str, Any]) -> str:
    env, args = report["environment"], report["args"]
    lines = []
    for key in report["profiles"]:
        lines += [*profile_lines(report, key), ""]
    if report["left_out"]:
        lines.append(f"left out: {'; '.join(report['left_out'])}")
    lines.append(
        "busy = the server's CPU share of one core during the run; CPU µs/req = CPU of the server's processes per request "
        "(/proc, 10 ms ticks); RSS = their resident memory after the run; redis cmd/req = INFO commandstats calls (commands "
        "inside scripts included); evalsha/req = script calls the clients sent; rt/req = Redis socket reads (node-redis "
        "writes the commands of one event-loop tick together, so its rt/req is below its evalsha/req); medians, (min–max) over rounds"
    )
    lines.append(
        "upstream = requests that reached the upstream during the measured rounds (its stub_status); "
        "A/B = row A's figure over row B's in the same round, median (min–max) over rounds"
    )
    lines.append(
        "nginx has no JWT and no body checks (marked in 'what it runs'); node verifies every token (jose, no verified-token cache); "
        "express-rate-limit has fixed windows only (the gateway's api limits are sliding window and token bucket); "
        "nginx's limit_req is in shared memory, not Redis"
    )
    lines.append(
        f"load: {env['load_tool']} -c{args['connections']} {args['seconds']:g}s x {args['rounds']} rounds, warm-up {args['warmup']:g}s per target; "
        f"cores: load/upstream/redis {env['load_cores'] or 'unpinned'}, proxy under test {env['server_cores'] or 'unpinned'}; "
        f"upstream {env.get('upstream')}"
    )
    if env["load_tool"] != "wrk":
        lines.append("note: without wrk (apt-get install wrk) the bundled aiohttp load generator saturates long before nginx does")
    if report["findings"]:
        lines.append("")
        lines.append("findings:")
        lines += [f"  - {finding}" for finding in report["findings"]]
    else:
        lines.append("findings: none (statuses, Redis counts, checks and logs as expected)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: 1 s runs, 2 rounds (same as --seconds 1 --rounds 2 --warmup 1)")
    parser.add_argument("--seconds", type=float, default=None, help="length of each measured load run (default 3; --quick 1)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over the targets per profile (default 3; --quick 2)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up load per target and profile (default 1)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent keep-alive connections")
    parser.add_argument(
        "--profiles", default=",".join(P.PROFILES),
        help="comma-separated, of " + "; ".join(f"{key} ({profile.title})" for key, profile in P.PROFILES.items()),
    )
    parser.add_argument(
        "--targets", default=",".join(P.TARGETS),
        help=f"comma-separated, of {', '.join(P.TARGETS)} (gateway brings a profile's gateway rows: cache adds gateway-memory and gateway-proxied)",
    )
    parser.add_argument("--no-node", action="store_true", help="leave the Node stack out (no npm)")
    parser.add_argument("--no-nginx-upstream", action="store_true", help="use the asyncio upstream even when nginx is installed")
    parser.add_argument("--no-chart", action="store_true", help="no PNG")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (configs, logs, Lua scripts)")
    args = parser.parse_args()
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 3.0)
    args.rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else 1.0
    if args.rounds < 1 or args.seconds < 1 or args.warmup < 1 or args.connections < 1:
        parser.error("--rounds, --seconds, --warmup and --connections must be at least 1")
    args.profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [p for p in args.profiles if p not in P.PROFILES] + [t for t in args.targets if t not in P.TARGETS]
    if unknown:
        parser.error(f"unknown profile or target: {', '.join(unknown)}")
    rows = sum(
        len([t for t in args.targets if t not in P.PROFILES[key].left_out]) + (len(P.PROFILES[key].gateway_rows) if "gateway" in args.targets else 0)
        for key in args.profiles
    )
    runs = rows * (args.rounds + 1)
    estimate = rows * (args.warmup + args.rounds * args.seconds) + runs * 0.4 + 10
    say(f"{len(args.profiles)} profiles, {rows} rows over them, {runs} load runs, about {estimate / 60:.1f} min")
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"profiles-{stamp}.json"
    chart_path = RESULTS / f"profiles-{stamp}.png"
    report["chart"] = None
    if not args.no_chart:
        from benchmarks.chart import render

        made, message = render(report, chart_path)
        report["chart"] = str(made.relative_to(ROOT)) if made else None
        report["chart_note"] = message
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(table(report))
    print()
    print(f"every run: {out.relative_to(ROOT)}")
    if not args.no_chart:
        print(f"chart: {report['chart']}" if report["chart"] else f"chart: skipped — {report['chart_note']}")
    print(f"total {elapsed():.0f}s")


if __name__ == "__main__":
    main()
