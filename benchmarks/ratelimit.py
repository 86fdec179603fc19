"""What Redis-backed rate limits cost the gateway: Redis round trips per request, and throughput.

    python -m benchmarks.ratelimit [--seconds 6] [--rounds 3] [--connections 32] [--warmup 2]

Everything runs on loopback and is started (and stopped) here: a redis-server on a free port,
nginx serving a 1 KB JSON file (benchmarks/profiles.py start_upstream) and three gateways
(``python -m gateway run``), all on the same route:

    (a) no policies;
    (b) two Redis-backed limits so high nothing is denied (ip, fixed window; route, sliding
        window): the rules want exactly one Redis round trip (one EVALSHA) per request;
    (c) 10 per minute, flooded from one client: after the first denial the over-limit key is
        remembered in the process, so the flood costs ~0 Redis commands per request.

Redis commands per request come from ``INFO commandstats`` before and after each load run (the
benchmark's own INFO calls left out). Throughput: wrk (else a bundled aiohttp generator) with
--connections keep-alive connections; with taskset, load, nginx and Redis share half the cores
and the gateway gets the other half (on the direct nginx row nginx moves there instead). After a
warm-up of each target, the rounds alternate nginx, (a), (b), so (b)/(a) compares like with like;
(c) runs once at the end. A table goes to the terminal and every run to
benchmarks/results/ratelimit-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import redis

from benchmarks import profiles as P
from benchmarks.common import (
    ROOT,
    Processes,
    cores_busy,
    cpu_plan,
    cpu_seconds,
    findings_lines,
    fmt_ms,
    free_port,
    get,
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
    version,
    wait_for_port,
)

PATH = "/bench"
HIGH = 10_000_000  # a limit nothing reaches in a run
LIMITS = {
    "a": None,
    "b": [
        {"key": "ip", "limit": HIGH, "window": "1m"},
        {"key": "route", "limit": HIGH, "window": "1m", "algorithm": "sliding_window"},
    ],
    "c": [{"key": "ip", "limit": 10, "window": "1m"}],
}
LABELS = {
    "upstream": "upstream direct",
    "a": "gateway (a) no policies",
    "b": "gateway (b) 2 redis limits",
    "c": "gateway (c) 10/min flood",
}
OWN_COMMANDS = {"cmdstat_info"}  # the benchmark's own INFO calls




def gateway_config(port: int, redis_port: int, upstream_port: int, limits: list[dict[str, Any]] | None) -> dict[str, Any]:
    route: dict[str, Any] = {"name": "bench", "match": {"path": PATH}, "upstream": "origin"}
    if limits:
        route["rate_limit"] = limits
    return {
        "listen": {"host": "127.0.0.1", "port": port, "limits": {"drain_timeout": "1s"}},
        "workers": 1,
        "admin": False,
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout": "1s"},
        "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{upstream_port}"]}},
        "routes": [route],
        "logging": {"level": "info", "format": "json", "access_log": False},
    }


def redis_counters(client: redis.Redis) -> dict[str, Any]:
    """One INFO call: calls per command (those run inside scripts included) and socket reads/writes."""
    info = client.execute_command("INFO", "stats", "commandstats")
    calls = {name: int(value["calls"]) for name, value in info.items() if name.startswith("cmdstat_") and name not in OWN_COMMANDS}
    return {"calls": calls, "reads": int(info["total_reads_processed"]), "writes": int(info["total_writes_processed"])}


def redis_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two snapshots, the benchmark's own INFO call (1 read, 1 write) taken out.

    INFO commandstats counts the commands a script runs (redis.call) as well as the commands
    clients send, so the round trips are counted separately: Redis's socket reads from its
    clients (a command, or a pipeline, is one read; connecting and closing add a few).
    """
    calls = {name.removeprefix("cmdstat_"): after["calls"].get(name, 0) - before["calls"].get(name, 0) for name in after["calls"]}
    calls = {name: n for name, n in sorted(calls.items()) if n}
    return {"commands": calls, "reads": after["reads"] - before["reads"] - 1, "writes": after["writes"] - before["writes"] - 1}


def pin(pid: int, cores: Sequence[int] | None) -> None:
    """Moves a process and its children (nginx's worker) to ``cores``."""
    if not cores:
        return
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            pids += [int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    for each in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", ",".join(map(str, cores)), str(each)], capture_output=True, check=False)


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_cores, server_cores = cpu_plan()
    scratch = Path(tempfile.mkdtemp(prefix="bench-ratelimit-"))
    processes = Processes(scratch)
    environment = {"load_tool": load_tool(), "load_cores": load_cores, "gateway_cores": server_cores, "redis_server": version(["redis-server", "--version"])}
    report = new_report("ratelimit", args, environment, runs=[])
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        say(f"scratch {scratch}; load: {load_tool()}; cores: load/nginx/redis {load_cores or 'any'}, gateway {server_cores or 'any'}")
        redis_port = free_port()
        redis_server = processes.start(
            "redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(scratch)], load_cores
        )
        wait_for_port(redis_port, redis_server, processes, "redis")
        client = redis.Redis(port=redis_port, socket_timeout=5)
        client.ping()
        upstream, upstream_port, upstream_kind = P.start_upstream(processes, scratch, load_cores, report)
        say(f"redis on :{redis_port}, {upstream_kind} on :{upstream_port}")

        urls = {"upstream": f"http://127.0.0.1:{upstream_port}{PATH}"}
        gateways = {}
        ports: dict[str, int] = {}
        for name, limits in LIMITS.items():
            port = free_port()
            config = gateway_config(port, redis_port, upstream_port, limits)
            path = scratch / f"gateway-{name}.yaml"
            path.write_text(json.dumps(config, indent=2))  # JSON is YAML
            report.setdefault("configs", {})[name] = config
            gateways[name] = processes.start(f"gateway-{name}", [sys.executable, "-m", "gateway", "run", "-c", str(path)], server_cores, cwd=ROOT)
            urls[name] = f"http://127.0.0.1:{port}{PATH}"
            ports[name] = port
        for name, process in gateways.items():
            wait_for_port(ports[name], process, processes, f"gateway-{name}")
        for name, url in urls.items():
            status, headers, body = get(url)
            limited = "RateLimit" in headers
            say(f"check {LABELS[name]}: {status}, {len(body)} bytes{', RateLimit: ' + headers['RateLimit'] if limited else ''}")
            if status != 200 or (name in ("b", "c")) != limited:
                raise RuntimeError(f"{LABELS[name]} answered {status} (RateLimit header: {limited}) to the first request: {body[:300]!r}")
        report["environment"]["upstream_body_bytes"] = len(get(urls["upstream"])[2])

        def measure(name: str, phase: str, round_: int | None, seconds: float) -> dict[str, Any]:
            if name == "upstream":
                pin(upstream.pid, server_cores)
            try:
                server_pid = upstream.pid if name == "upstream" else gateways[name].pid
                cpu_before = {"server": cpu_seconds(server_pid), "redis": cpu_seconds(redis_server.pid), "core": cores_busy(server_cores)}
                before = redis_counters(client)
                result = run_load(processes, urls[name], seconds, args.connections, load_cores, name="load")
                ended = time.time()
                time.sleep(0.2)  # requests still in flight when the load stopped reach Redis
                after = redis_counters(client)
                cpu = {key: cpu_seconds(pid) - cpu_before[key] for key, pid in (("server", server_pid), ("redis", redis_server.pid))}
                cpu["core"] = cores_busy(server_cores) - cpu_before["core"]
            finally:
                if name == "upstream":
                    pin(upstream.pid, load_cores)
            delta = redis_delta(before, after)
            commands = delta["commands"]
            total = sum(commands.values())
            trips = delta["reads"]
            allowed = sum(n for code, n in result["statuses"].items() if code.startswith("2"))
            denied = result["statuses"].get("429", 0)
            entry = {
                "target": name, "label": LABELS[name], "phase": phase, "round": round_, "ended": ended, **result,
                "redis_commands": commands, "redis_total": total, "redis_evalsha": commands.get("evalsha", 0),
                "redis_round_trips": trips, "redis_writes": delta["writes"],
                "round_trips_per_request": trips / result["requests"] if result["requests"] else None,
                "commands_per_request": total / result["requests"] if result["requests"] else None,
                "evalsha_per_allowed": commands.get("evalsha", 0) / allowed if allowed else None,
                "round_trips_per_denied": trips / denied if denied else None,
                "allowed": allowed, "denied": denied,
                # The server's CPU (the gateway, or nginx on the direct row) and Redis's: busy share
                # of the run, and µs per request (/proc ticks: 10 ms granularity).
                "server_cpu_s": cpu["server"], "redis_cpu_s": cpu["redis"],
                "server_busy": cpu["server"] / (result["duration_us"] / 1e6) if result["duration_us"] else None,
                # Busy time of the server's cores not spent by the server: other processes (unpinned: all the rest).
                "foreign_busy": max(cpu["core"] - cpu["server"], 0.0) / (result["duration_us"] / 1e6) / (len(server_cores) if server_cores else os.cpu_count() or 1)
                if result["duration_us"] else None,
                "loadavg": Path("/proc/loadavg").read_text().split()[0],
                "server_cpu_us_per_request": cpu["server"] / result["requests"] * 1e6 if result["requests"] else None,
                "redis_cpu_us_per_request": cpu["redis"] / result["requests"] * 1e6 if result["requests"] else None,
            }
            report["runs"].append(entry)
            lat = result["latency_us"]
            errors = {k: v for k, v in result["errors"].items() if v and k != "status"}
            say(
                f"{phase}{'' if round_ is None else f' {round_}/{args.rounds}'} {LABELS[name]}: {result['rps']:,.0f} req/s, "
                f"p50 {fmt_ms(lat['p50'])} ms, p99 {fmt_ms(lat['p99'])} ms, server CPU {entry['server_busy']:.0%} (others on its core {entry['foreign_busy']:.0%}), statuses {statuses_text(result['statuses'])}, "
                f"redis {trips} round trips, {commands.get('evalsha', 0)} evalsha, {total} commands incl. in scripts" + (f", socket errors {errors}" if errors else "")
            )
            return entry

        for name in ("upstream", "a", "b", "c"):
            measure(name, "warmup", None, args.warmup)
        for round_ in range(1, args.rounds + 1):
            for name in ("upstream", "a", "b"):
                measure(name, "round", round_, args.seconds)
        measure("c", "flood", None, args.seconds)

        for name in gateways:
            load_ends = [run["ended"] for run in report["runs"]]
            report["findings"] += log_findings(name, processes.log_text(f"gateway-{name}"), load_ends)
            report.setdefault("gateway_logs", {})[name] = processes.log_text(f"gateway-{name}")[-5000:]
        report["findings"] += nginx_errors(scratch / "nginx-upstream-error.log")
    finally:
        tear_down(previous_term, processes, scratch, args.keep, report["findings"])
    report["summary"] = summarise(report)
    report["findings"] += check(report)
    return report




def summarise(report: dict[str, Any]) -> dict[str, Any]:
    runs = [run for run in report["runs"] if run["phase"] != "warmup"]
    summary: dict[str, Any] = {}
    for name in ("upstream", "a", "b", "c"):
        mine = [run for run in runs if run["target"] == name]
        if not mine:
            continue
        requests = sum(run["requests"] for run in mine)
        total = sum(run["redis_total"] for run in mine)
        trips = sum(run["redis_round_trips"] for run in mine)
        evalsha = sum(run["redis_evalsha"] for run in mine)
        allowed = sum(run["allowed"] for run in mine)
        denied = sum(run["denied"] for run in mine)
        statuses = summed_counts(run["statuses"] for run in mine)
        summary[name] = {
            "label": LABELS[name],
            "runs": len(mine),
            "rps": spread([run["rps"] for run in mine]),
            "p50_ms": statistics.median(run["latency_us"]["p50"] for run in mine) / 1000,
            "p99_ms": statistics.median(run["latency_us"]["p99"] for run in mine) / 1000,
            "server_busy": statistics.median(run["server_busy"] for run in mine),
            "server_cpu_us_per_request": statistics.median(run["server_cpu_us_per_request"] or 0 for run in mine),
            "redis_cpu_us_per_request": statistics.median(run["redis_cpu_us_per_request"] or 0 for run in mine),
            "requests": requests,
            "statuses": dict(sorted(statuses.items())),
            "socket_errors": {k: sum(run["errors"][k] for run in mine) for k in ("connect", "read", "write", "timeout")},
            "allowed": allowed,
            "denied": denied,
            "redis_round_trips": trips,
            "redis_evalsha": evalsha,
            "redis_total": total,
            "round_trips_per_request": trips / requests if requests else None,
            "evalsha_per_request": evalsha / requests if requests else None,
            "commands_per_request": total / requests if requests else None,
            "evalsha_per_allowed": evalsha / allowed if allowed else None,
            "round_trips_per_allowed": trips / allowed if allowed else None,
            "round_trips_per_denied": trips / denied if denied else None,
        }
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        if run["round"] is not None:
            by_round.setdefault(run["round"], {})[run["target"]] = run["rps"]
    ratios = {
        "b_over_a": [r["b"] / r["a"] for r in by_round.values() if r.get("a") and "b" in r],
        "a_over_upstream": [r["a"] / r["upstream"] for r in by_round.values() if r.get("upstream") and "a" in r],
        "b_over_upstream": [r["b"] / r["upstream"] for r in by_round.values() if r.get("upstream") and "b" in r],
    }
    summary["ratios"] = {name: {"per_round": values, **spread(values)} for name, values in ratios.items() if values}
    return summary


def check(report: dict[str, Any]) -> list[str]:
    """What does not look as the rules say it should."""
    findings = []
    summary = report["summary"]
    for name in ("upstream", "a", "b"):
        row = summary.get(name)
        if row and set(row["statuses"]) - {"200"}:
            findings.append(f"{row['label']}: statuses other than 200: {row['statuses']}")
    c = summary.get("c")
    if c:
        other = {code: n for code, n in c["statuses"].items() if code not in ("200", "429")}
        if other:
            findings.append(f"{c['label']}: statuses other than 200/429: {other}")
        if c["statuses"].get("200", 0) > 20:
            findings.append(f"{c['label']}: {c['statuses'].get('200')} requests allowed where ~10 per minute were expected")
        if c["round_trips_per_request"] is not None and c["round_trips_per_request"] > 0.01:
            findings.append(f"{c['label']}: {c['round_trips_per_request']:.3f} Redis round trips per request (a remembered denial should cost none)")
    b = summary.get("b")
    if b and b["evalsha_per_allowed"] is not None:
        if b["evalsha_per_allowed"] < 0.99:
            findings.append(f"{b['label']}: {b['evalsha_per_allowed']:.3f} EVALSHA per allowed request: some decisions did not reach Redis (fallback?)")
        # Up to one request per connection is still in flight when a load run stops: it reaches
        # Redis but the load tool does not count it.
        slack = b["allowed"] + report["args"]["connections"] * b["runs"]
        if b["redis_evalsha"] > slack * 1.002:
            findings.append(f"{b['label']}: {b['evalsha_per_allowed']:.3f} EVALSHA per allowed request (the rule is one round trip)")
        other = b["redis_round_trips"] - b["redis_evalsha"]
        if other > 0.01 * b["requests"]:
            findings.append(f"{b['label']}: {other} Redis round trips besides the EVALSHAs ({other / b['requests']:.3f} per request)")
    a = summary.get("a")
    if a and a["redis_total"]:
        findings.append(f"{a['label']}: {a['redis_total']} Redis commands with no policies")
    for name in ("upstream", "a", "b", "c"):
        row = summary.get(name)
        if row and any(row["socket_errors"].values()):
            findings.append(f"{row['label']}: socket errors {row['socket_errors']}")
    noisy = [run for run in report["runs"] if run["phase"] != "warmup" and run["target"] != "upstream" and (run["foreign_busy"] or 0) > 0.05]
    if noisy and report["environment"]["gateway_cores"]:
        worst = max(noisy, key=lambda run: run["foreign_busy"])
        findings.append(
            f"other processes used the gateway's core during {len(noisy)} measured run(s) (worst: {worst['label']} "
            f"round {worst['round']}, {worst['foreign_busy']:.0%} of the core, load average {worst['loadavg']}): throughput figures are noisy"
        )
    for run in report["runs"]:
        if run["phase"] != "warmup" and run["target"] in ("a", "b") and run["latency_us"]["max"] > 1_000_000:
            findings.append(f"{run['label']} round {run['round']}: a request took {run['latency_us']['max'] / 1e6:.2f}s")
    return findings


def table(report: dict[str, Any]) -> str:
    summary = report["summary"]
    lines = [
        f"{'target':<28} {'req/s median':>12} {'(min–max)':>17} {'p50 ms':>7} {'p99 ms':>7} {'CPU':>5} {'µs/req':>6} {'requests':>9}  {'statuses':<20} {'redis rt/req':>12} {'evalsha/req':>11} {'cmds/req':>9}",
    ]
    for name in ("upstream", "a", "b", "c"):
        row = summary.get(name)
        if not row:
            continue
        label = row["label"] if name != "upstream" else f"upstream direct ({report['environment'].get('upstream', '?')})"
        rps = row["rps"]
        span = f"({rps['min']:,.0f}–{rps['max']:,.0f})"
        if name == "upstream":
            redis_figures = f"{'-':>12} {'-':>11} {'-':>9}"
        else:
            redis_figures = f"{row['round_trips_per_request']:>12.4f} {row['evalsha_per_request']:>11.4f} {row['commands_per_request']:>9.3f}"
        lines.append(
            f"{label:<28} {rps['median']:>12,.0f} {span:>17} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} {row['server_busy']:>5.0%} {row['server_cpu_us_per_request']:>6.0f} "
            f"{row['requests']:>9,}  {statuses_text(row['statuses']):<20} {redis_figures}"
        )
    lines.append("")
    b, c = summary.get("b"), summary.get("c")
    lines.append(
        "CPU, µs/req: the server's (gateway's; nginx's on the direct row) CPU busy share during the runs, and CPU µs per request "
        "(medians; /proc, 10 ms ticks)"
    )
    lines.append(
        "redis rt = round trips (Redis's socket reads from clients); cmds = INFO commandstats calls, which count the "
        "commands a script runs (redis.call) too"
    )
    if b:
        lines.append(
            f"(b) {b['redis_round_trips']:,} round trips, {b['redis_evalsha']:,} EVALSHA for {b['allowed']:,} allowed requests "
            f"= {b['round_trips_per_allowed']:.4f} / {b['evalsha_per_allowed']:.4f} per allowed request (rule: 1, whatever the number of limits; "
            f"requests in flight when a load run stops reach Redis but are not counted by the load tool)"
        )
    if c:
        per_denied = "n/a" if c["round_trips_per_denied"] is None else f"{c['round_trips_per_denied']:.5f}"
        lines.append(
            f"(c) {c['redis_round_trips']} round trips, {c['redis_evalsha']} EVALSHA for {c['denied']:,} denied requests "
            f"= {per_denied} per denied request (rule: ~0)"
        )
    ratios = summary.get("ratios", {})
    for key, text in (("b_over_a", "(b)/(a)"), ("a_over_upstream", "(a)/upstream"), ("b_over_upstream", "(b)/upstream")):
        if key in ratios:
            r = ratios[key]
            per_round = ", ".join(f"{v:.3f}" for v in r["per_round"])
            lines.append(f"throughput {text:<13} median {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}; per round {per_round})")
    env = report["environment"]
    lines.append(
        f"load: {env['load_tool']} -c{report['args']['connections']} {report['args']['seconds']:g}s x {report['args']['rounds']} rounds; "
        f"cores: load+redis+{env.get('upstream', 'upstream')} {env['load_cores'] or 'unpinned'}, gateway {env['gateway_cores'] or 'unpinned'}"
    )
    if env["load_tool"] != "wrk":
        lines.append("note: without wrk the bundled aiohttp load generator shares the load core and may saturate before the servers do")
    lines += findings_lines(report, "statuses, Redis counts and gateway logs as expected")
    return "\n".join(lines)


def main() -> None:
    load_benchmark_main(
        "ratelimit", __doc__ or "", run, table, seconds=6.0, warmup=2.0,
        rounds_help="rounds of upstream, (a), (b)", warmup_help="warm-up load per target", keep_help="keep the scratch folder (configs, logs)",
    )  # fmt: skip


if __name__ == "__main__":
    main()
