"""The floor of the gateway's server stack: a bare aiohttp server on uvloop against nginx proxy_pass.

    python -m benchmarks.floor [--quick] [--seconds 3] [--rounds 3] [--warmup 1] [--connections 32] [--keep]

The benchmarks issue states its targets as the gateway's CPU per request over nginx proxy_pass's
in the same run: a cache hit and a rate-limited 429 should cost at most 3x. Whatever the gateway
does, it answers through aiohttp's server on uvloop; this benchmark measures what that server
alone costs when it answers straight from memory with no policies at all, in the same unit, and
so how much of the 3x is spent before the gateway does anything of its own.

Everything runs on loopback and is started (and stopped, also on Ctrl-C, SIGTERM or an error)
here: the upstream of ``python -m benchmarks`` (nginx serving a static 1 KB JSON,
benchmarks/profiles.py ``start_upstream``) and three servers under test, each on its own port:

    nginx proxy_pass         the reference nginx config's ``/pass`` location: proxy_pass to the
                             upstream with keep-alive (the unit of the issue's targets);
    aiohttp 200 from memory  ``python -m benchmarks.floor serve PORT 200``: aiohttp's low-level
                             server (``web.Server`` + ``loop.create_server``) on uvloop answering
                             every request with the upstream's 1 KB JSON: the least a cache hit
                             can cost on this stack;
    aiohttp 429 from memory  ``python -m benchmarks.floor serve PORT 429``: the same server
                             answering 429 with the gateway's rate-limited problem+json body and a
                             Retry-After header: the least a flood's 429 can cost.

With two cores or more (and taskset), wrk and the upstream run on the load cores, the servers
under test on the others. After a warm-up of every row, the rounds alternate them (nginx, 200,
429, nginx, 200, 429, ...), so each aiohttp row's CPU per request is divided by nginx
proxy_pass's of the same round. Per run, from /proc: req/s, p50/p99 (wrk), the server's CPU
(user + system of its processes: nginx master + worker, the aiohttp process) per request, its
core's busy, softirq and other processes' shares, and the statuses (429 for the 429 row, 200 for
the others; anything else is a finding). The table gives medians with (min–max) over the rounds.
Every run goes to benchmarks/results/floor-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import profiles as P
from benchmarks.common import (
    NGINX,
    ROOT,
    Processes,
    core_times,
    cpu_plan,
    elapsed,
    findings_lines,
    fmt_ms,
    free_port,
    get,
    interrupt,
    load_environment,
    load_options,
    load_tool,
    machine,
    new_report,
    nginx_errors,
    payload,
    run_and_save,
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

PATH = P.PROFILES["passthrough"].path  # the reference config's plain proxy_pass location
ROWS = {
    "nginx": P.PROXY_PASS,
    "200": "aiohttp 200 from memory",
    "429": "aiohttp 429 from memory",
}
BASELINE = "nginx"
EXPECTED = {"nginx": "200", "200": "200", "429": "429"}
# The issue's bound for each aiohttp row's counterpart in the gateway, over nginx proxy_pass.
BUDGETS = {"200": ("cache hit", P.PROFILES["cache"].proxy_pass_bound), "429": ("flood 429", P.PROFILES["flood"].proxy_pass_bound)}
REQUEST_ID = "0f3c9a1e5b7d42c8a6e19b0d3f5c7a21"
RETRY_AFTER = "60"
QUIET = 0.05  # a run is quiet when other processes took under this share of the server's core


# ---------------------------------------------------------------------------------------------
# The server under test
# ---------------------------------------------------------------------------------------------


def answer(status: int) -> tuple[bytes, dict[str, str]]:
    """The body and headers every request gets: the upstream's 1 KB JSON for 200; for 429 the
    problem body the gateway's rate limit sends (a fixed request id) with Retry-After."""
    if status == 200:
        return payload(1024), {"Content-Type": "application/json"}
    if status == 429:
        from gateway.errors import PROBLEM_CONTENT_TYPE, problem_body

        body = problem_body(429, "rate limit exceeded", REQUEST_ID)
        return body, {"Content-Type": PROBLEM_CONTENT_TYPE, "Cache-Control": "no-store", "Retry-After": RETRY_AFTER}
    raise ValueError(f"no answer for status {status} (200 or 429)")


def serve(port: int, status: int) -> None:
    """aiohttp's low-level server on uvloop: one handler, no application, no access log; stops on
    SIGTERM or SIGINT. Its first output line names the event loop it runs on."""
    import aiohttp
    import uvloop
    from aiohttp import web

    body, headers = answer(status)

    async def handle(request: web.BaseRequest) -> web.Response:
        return web.Response(status=status, body=body, headers=headers)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = web.Server(handle, access_log=None)
        listener = await loop.create_server(server, "127.0.0.1", port, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop_name = f"{type(loop).__module__}.{type(loop).__name__}"
        print(f"serving {status} ({len(body)} bytes) on 127.0.0.1:{port}; loop {loop_name}; aiohttp {aiohttp.__version__}", flush=True)
        await stop.wait()
        listener.close()
        await server.shutdown(1.0)
        await listener.wait_closed()

    uvloop.run(main())


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def start_servers(processes: Processes, scratch: Path, cores: list[int] | None, upstream_port: int, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The reference nginx and the two aiohttp servers, each listening: {row: {"process", "port", "name"}}."""
    servers: dict[str, dict[str, Any]] = {}
    port = free_port()
    config = P.nginx_reference_config(scratch, port, upstream_port)
    report["configs"]["nginx_proxy"] = config.read_text()
    command = [NGINX, "-c", str(config), "-p", str(scratch), "-e", str(scratch / "nginx-proxy-error.log"), "-g", "daemon off;"]
    servers["nginx"] = {"process": processes.start("nginx-proxy", command, cores), "port": port, "name": "nginx-proxy"}
    for status in ("200", "429"):
        port = free_port()
        name = f"aiohttp-{status}"
        process = processes.start(name, [sys.executable, "-m", "benchmarks.floor", "serve", str(port), status], cores, cwd=ROOT)
        servers[status] = {"process": process, "port": port, "name": name}
    for server in servers.values():
        wait_for_port(server["port"], server["process"], processes, server["name"])
    for row in ("200", "429"):
        wait_for_start_line(processes, servers[row]["name"])
    return servers


def wait_for_start_line(processes: Processes, name: str, timeout: float = 5.0) -> None:
    """The port may accept before ``serve`` has printed the line naming its event loop."""
    deadline = time.monotonic() + timeout
    while "serving" not in processes.log_text(name) and time.monotonic() < deadline:
        time.sleep(0.05)


def check_answers(servers: dict[str, dict[str, Any]], document: bytes, report: dict[str, Any]) -> None:
    """One GET per row before any load: the status, type and body each must answer with."""
    wanted = {"nginx": (document, "application/json"), "200": (document, "application/json")}
    body_429, headers_429 = answer(429)
    wanted["429"] = (body_429, headers_429["Content-Type"])
    for row, server in servers.items():
        status, headers, body = get(f"http://127.0.0.1:{server['port']}{PATH}")
        lower = {k.lower(): v for k, v in headers.items()}
        report["checks"][row] = {"status": status, "bytes": len(body), "headers": headers}
        say(f"check {ROWS[row]:<24}: {status}, {len(body)} bytes, {lower.get('content-type')}")
        expected_body, expected_type = wanted[row]
        problems = []
        if str(status) != EXPECTED[row]:
            problems.append(f"status {status}, not {EXPECTED[row]}")
        if body != expected_body:
            problems.append(f"a body of {len(body)} bytes that differs from the expected {len(expected_body)}")
        if not lower.get("content-type", "").startswith(expected_type):
            problems.append(f"Content-Type {lower.get('content-type')!r}, not {expected_type}")
        if row == "429" and lower.get("retry-after") != RETRY_AFTER:
            problems.append(f"Retry-After {lower.get('retry-after')!r}")
        if problems:
            raise RuntimeError(f"{ROWS[row]} answered with {'; '.join(problems)}: {body[:300]!r}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not os.path.exists(NGINX):
        raise SystemExit(f"nginx is not installed ({NGINX}; apt-get install nginx-light): there is no proxy_pass to compare with")
    load_cores, server_cores = cpu_plan()
    if server_cores:
        pinning = f"pinned: {load_tool()} and the upstream on cores {load_cores}, the server under test on {server_cores}"
    else:
        pinning = f"not pinned ({len(os.sched_getaffinity(0))} core(s) or no taskset): everything shares every core"
    scratch = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    scratch.chmod(0o755)  # nginx's workers (nobody, when started as root) read files in here
    processes = Processes(scratch)
    import aiohttp
    import uvloop

    environment = {
        **machine(),
        **load_environment(load_cores),
        "server_cores": server_cores,
        "pinning": pinning,
        "nginx": version([NGINX, "-v"]),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
    }
    report = new_report("floor", args, environment, rows=dict(ROWS), budgets={row: {"of": what, "bound": bound} for row, (what, bound) in BUDGETS.items()}, configs={}, checks={}, runs=[])
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        say(f"scratch {scratch}; load: {load_tool()} -t1 -c{args.connections}; {pinning}")
        _, upstream_port, _ = P.start_upstream(processes, scratch, load_cores, report)
        status, _, document = get(f"http://127.0.0.1:{upstream_port}{PATH}")
        if status != 200 or document != payload(1024):
            raise RuntimeError(f"the upstream answered {status} with {len(document)} bytes, not the 1 KB document: {document[:200]!r}")
        say(f"upstream ({report['environment']['upstream']}) on :{upstream_port}")
        servers = start_servers(processes, scratch, server_cores, upstream_port, report)
        for row in ("200", "429"):
            line = processes.log_text(servers[row]["name"]).strip()
            report["environment"][f"aiohttp_{row}_started"] = line
            say(f"{ROWS[row]}: {line}")
        say(f"{P.PROXY_PASS} on :{servers['nginx']['port']}{PATH}")
        check_answers(servers, document, report)

        def measure(row: str, phase: str, round_: int | None, seconds: float) -> dict[str, Any]:
            pid = servers[row]["process"].pid
            before = {"cpu": tree_cpu_seconds(pid), "core": core_times(server_cores), "load": core_times(load_cores), "clock": time.monotonic()}
            result = run_load(processes, f"http://127.0.0.1:{servers[row]['port']}{PATH}", seconds, args.connections, load_cores)
            after = {"cpu": tree_cpu_seconds(pid), "core": core_times(server_cores), "load": core_times(load_cores), "clock": time.monotonic()}
            window = after["clock"] - before["clock"]
            cores = len(server_cores) if server_cores else os.cpu_count() or 1
            load_cores_n = len(load_cores) if load_cores else os.cpu_count() or 1
            cpu = after["cpu"] - before["cpu"]
            busy = after["core"]["busy"] - before["core"]["busy"]
            softirq = after["core"]["softirq"] - before["core"]["softirq"]
            requests = result["requests"]
            entry = {
                "row": row, "label": ROWS[row], "phase": phase, "round": round_, "ended": time.time(), **result,
                "window_s": window,
                "cpu_s": cpu,
                "cpu_us_per_request": cpu / requests * 1e6 if requests else None,
                # Shares of the server's core(s) over the window: the server itself, the kernel's
                # softirq work (loopback networking; what of it runs while the server is on the CPU
                # is in the server's system time too, so the two overlap), everything else.
                "server_busy": cpu / window / cores,
                "softirq_busy": softirq / window / cores,
                "others_busy": max(busy - softirq - cpu, 0.0) / window / cores,
                "load_core_busy": (after["load"]["busy"] - before["load"]["busy"]) / window / load_cores_n,  # wrk + the upstream
                "loadavg": Path("/proc/loadavg").read_text().split()[0],
            }
            if phase == "round" and row != BASELINE:
                base = next(r for r in report["runs"] if r["phase"] == "round" and r["round"] == round_ and r["row"] == BASELINE)
                ours, theirs = entry["cpu_us_per_request"], base["cpu_us_per_request"]
                entry["cpu_ratio_to_proxy_pass"] = ours / theirs if ours and theirs else None
            report["runs"].append(entry)
            lat = result["latency_us"]
            errors = {k: v for k, v in result["errors"].items() if v and k != "status"}
            ratio = entry.get("cpu_ratio_to_proxy_pass")
            say(
                f"{phase}{'' if round_ is None else f' {round_}/{args.rounds}'} {ROWS[row]:<24}: {result['rps']:>7,.0f} req/s, "
                f"p50 {fmt_ms(lat['p50'])} ms, p99 {fmt_ms(lat['p99'])} ms, {entry['cpu_us_per_request'] or 0:.1f} CPU µs/req "
                f"(its core: server {entry['server_busy']:.0%}, softirq {entry['softirq_busy']:.0%}, others {entry['others_busy']:.0%}; "
                f"load core {entry['load_core_busy']:.0%})"
                + (f"; x{ratio:.2f} {P.PROXY_PASS}" if ratio else "")
                + f"; statuses {statuses_text(result['statuses'])}"
                + (f", socket errors {errors}" if errors else "")
            )
            return entry

        for row in ROWS:
            measure(row, "warmup", None, args.warmup)
        for round_ in range(1, args.rounds + 1):
            for row in ROWS:
                measure(row, "round", round_, args.seconds)

        for row in ("200", "429"):
            lines = processes.log_text(servers[row]["name"]).strip().splitlines()
            if "uvloop" not in (lines[0] if lines else ""):
                report["findings"].append(f"{ROWS[row]}: not on uvloop ({lines[0] if lines else 'no start line'})")
            if len(lines) > 1:
                report["findings"].append(f"{ROWS[row]}: {len(lines) - 1} more line(s) in its output: {' | '.join(lines[1:4])[:300]}")
        levels = ("warn", "error", "crit", "alert", "emerg")
        report["findings"] += nginx_errors(scratch / "nginx-proxy-error.log", levels) + nginx_errors(scratch / "nginx-upstream-error.log", levels)
    finally:
        tear_down(previous_term, processes, scratch, args.keep, report["findings"])
        report["environment"]["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    report["summary"] = summarise(report)
    report["findings"] += check(report)
    return report


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    measured = [r for r in report["runs"] if r["phase"] == "round"]
    summary: dict[str, Any] = {}
    for row, label in ROWS.items():
        mine = [r for r in measured if r["row"] == row]
        if not mine:
            continue
        statuses = summed_counts(r["statuses"] for r in mine)
        entry = {
            "label": label,
            "runs": len(mine),
            "requests": sum(r["requests"] for r in mine),
            "rps": spread([r["rps"] for r in mine]),
            "p50_ms": spread([r["latency_us"]["p50"] / 1000 for r in mine]),
            "p99_ms": spread([r["latency_us"]["p99"] / 1000 for r in mine]),
            "max_latency_ms": max(r["latency_us"]["max"] for r in mine) / 1000,
            "cpu_us_per_request": spread([r["cpu_us_per_request"] for r in mine if r["cpu_us_per_request"] is not None]),
            "server_busy": statistics.median(r["server_busy"] for r in mine),
            "softirq_busy": statistics.median(r["softirq_busy"] for r in mine),
            "others_busy": spread([r["others_busy"] for r in mine]),
            "load_core_busy": statistics.median(r["load_core_busy"] for r in mine),
            "statuses": dict(sorted(statuses.items())),
            "socket_errors": {k: sum(r["errors"][k] for r in mine) for k in ("connect", "read", "write", "timeout")},
        }
        if row in BUDGETS:
            what, bound = BUDGETS[row]
            ratios = [r["cpu_ratio_to_proxy_pass"] for r in mine if r.get("cpu_ratio_to_proxy_pass")]
            left = [bound - x for x in ratios]
            entry["cpu_ratio_to_proxy_pass"] = {"per_round": ratios, **spread(ratios)}
            entry["budget"] = {"of": what, "bound": bound, "left_per_round": left, "left": spread(left)}
        summary[row] = entry
    return summary


def check(report: dict[str, Any]) -> list[str]:
    """What does not look as it should, after the runs."""
    findings = []
    for row, entry in report["summary"].items():
        name = entry["label"]
        other = {code: n for code, n in entry["statuses"].items() if code != EXPECTED[row]}
        if other:
            findings.append(f"{name}: statuses other than {EXPECTED[row]}: {other} (of {entry['requests']:,} requests)")
        if any(entry["socket_errors"].values()):
            findings.append(f"{name}: socket errors {entry['socket_errors']}")
        if entry["max_latency_ms"] > 1000:
            findings.append(f"{name}: a request took {entry['max_latency_ms'] / 1000:.2f}s")
        ratio, budget = entry.get("cpu_ratio_to_proxy_pass"), entry.get("budget")
        if ratio and budget and ratio["median"] >= budget["bound"]:
            findings.append(
                f"{name}: {ratio['median']:.2f}x nginx proxy_pass's CPU per request: the bare server alone already takes the whole "
                f"{budget['bound']:g}x a {budget['of']} may cost"
            )
        if entry["server_busy"] < 0.85 and entry["load_core_busy"] > 0.9:
            findings.append(
                f"{name}: limited by the load core (wrk + the upstream, {entry['load_core_busy']:.0%} busy), not by the server "
                f"({entry['server_busy']:.0%} of its core): its req/s understates it, and its CPU per request is taken below saturation"
            )
    measured = [r for r in report["runs"] if r["phase"] == "round"]
    noisy = [r for r in measured if r["others_busy"] >= QUIET]
    if noisy and report["environment"]["server_cores"]:
        worst = max(noisy, key=lambda r: r["others_busy"])
        findings.append(
            f"other processes used the server's core for {QUIET:.0%} or more of {len(noisy)} of {len(measured)} measured runs "
            f"(worst: {worst['label']} round {worst['round']}, {worst['others_busy']:.0%}, load average {worst['loadavg']}): figures are noisy"
        )
    return findings


def fmt_spread(s: dict[str, float], digits: str) -> str:
    return f"{format(s['median'], digits)} ({format(s['min'], digits)}–{format(s['max'], digits)})" if s else "-"


def table(report: dict[str, Any]) -> str:
    summary, env, args = report["summary"], report["environment"], report["args"]
    lines = [
        f"{'row':<24} {'req/s (min–max)':>25} {'p50 ms':>6} {'p99 ms':>6} {'CPU µs/req (min–max)':>22} "
        f"{'busy':>5} {'softirq':>7} {'others':>6} {'load core':>9}  {'vs proxy_pass (min–max)':<24} statuses"
    ]
    for row, entry in summary.items():
        ratio = entry.get("cpu_ratio_to_proxy_pass")
        vs = "1.00" if row == BASELINE else (fmt_spread(ratio, ".2f") if ratio else "-")
        lines.append(
            f"{entry['label']:<24} {fmt_spread(entry['rps'], ',.0f'):>25} {entry['p50_ms']['median']:>6.2f} {entry['p99_ms']['median']:>6.2f} "
            f"{fmt_spread(entry['cpu_us_per_request'], '.1f'):>22} {entry['server_busy']:>5.0%} {entry['softirq_busy']:>7.0%} "
            f"{entry['others_busy']['median']:>6.0%} {entry['load_core_busy']:>9.0%}  {vs:<24} {statuses_text(entry['statuses'])}"
        )
    lines.append("")
    lines.append(footer(summary))
    lines.append("")
    lines.append(
        "CPU µs/req: user + system CPU of the server's processes (nginx: master + worker; aiohttp: its one process) over the requests "
        "wrk completed, from /proc (10 ms ticks). busy, softirq, others: shares of the server's core — the server, the kernel's "
        "softirq work (loopback networking; the part run while the server is on the CPU is in its system time too, so busy + softirq "
        "can pass 100%), other processes (what is left of the core's busy time, at least 0); load core: the busy share of the core wrk and the upstream run on. "
        "Medians (min–max) over the rounds; vs proxy_pass: CPU µs/req over nginx proxy_pass's in the same round."
    )
    lines.append(
        f"load: {env['load_tool']} -t1 -c{args['connections']} {args['seconds']:g}s x {args['rounds']} rounds, warm-up {args['warmup']:g}s "
        f"per row, loopback; upstream {env.get('upstream')}; {env['nginx']}, aiohttp {env['aiohttp']}, uvloop {env['uvloop']}, "
        f"Python {env['python']}; {env['pinning']}"
    )
    if env["load_tool"] != "wrk":
        lines.append("note: without wrk (apt-get install wrk) the bundled aiohttp load generator may saturate before the servers do")
    lines += findings_lines(report, "statuses, answers and logs as expected")
    return "\n".join(lines)


def footer(summary: dict[str, Any]) -> str:
    """What the ratios mean: the part of the issue's budget the bare server already uses, and what
    is left of it for the gateway's own work."""
    used, left = [], []
    for row, (what, bound) in BUDGETS.items():
        ratio, budget = summary.get(row, {}).get("cpu_ratio_to_proxy_pass"), summary.get(row, {}).get("budget")
        if not ratio or not budget:
            continue
        rest = budget["left"]
        used.append(f"{ratio['median']:.2f}x ({ratio['min']:.2f}–{ratio['max']:.2f}) for the {row} answer ({ratio['median'] / bound:.0%} of the {what}'s {bound:g}x)")
        left.append(f"{bound:g} − {ratio['median']:.2f} = {rest['median']:.2f}x ({rest['min']:.2f}–{rest['max']:.2f}) for a {what}")
    if not used:
        return "No ratio to nginx proxy_pass: no round measured both."
    bounds = " and ".join(f"a {what} at most {bound:g}x" for what, bound in BUDGETS.values())
    return (
        f"What the ratio means: the benchmarks issue allows {bounds} nginx proxy_pass's CPU per request. A bare aiohttp server on "
        f"uvloop, answering from memory with no policies, already takes {' and '.join(used)}. What is left for everything the "
        "gateway does itself (routing, request ids, the cache lookup or the limit's decision, headers, metrics, logging) is "
        f"budget − ratio: {'; '.join(left)}, in units of nginx proxy_pass's CPU per request. No gateway answer on this stack "
        "costs less than the bare server."
    )


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        if len(sys.argv) != 4:
            sys.exit("usage: python -m benchmarks.floor serve PORT STATUS")
        serve(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=(__doc__ or "").splitlines()[0])
    load_options(
        parser, seconds=3.0, warmup=1.0,
        rounds_help="rounds over the rows (default 3; --quick 2)",
        warmup_help="warm-up load per row (default 1)",
        keep_help="keep the scratch folder (configs, logs)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="about 15 s: 1 s runs, 2 rounds, 1 s warm-up")
    parser.set_defaults(seconds=None, rounds=None)
    args = parser.parse_args()
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 3.0)
    args.rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    if args.connections < 1:
        parser.error("--connections must be at least 1")
    runs = len(ROWS) * (args.rounds + 1)
    estimate = len(ROWS) * (args.warmup + args.rounds * args.seconds) + runs * 0.3 + 3
    say(f"{len(ROWS)} rows ({', '.join(ROWS.values())}), {runs} load runs, about {estimate:.0f}s")
    report, out = run_and_save("floor", run, args, parser)
    print()
    print(table(report))
    print(f"\nevery run: {out.relative_to(ROOT)}  (total {elapsed():.0f}s)")


if __name__ == "__main__":
    main()
