"""How the gateway's throughput scales with its worker processes: workers: 1 against workers: auto.

    python -m benchmarks.workers [--quick] [--workers 1,2,4] [--seconds 3] [--rounds 3] [--warmup 2]
                                 [--connections 64] [--keep]

Everything runs on loopback and is started (and stopped, also on Ctrl-C, SIGTERM or an error)
here: the upstream of ``python -m benchmarks`` (nginx serving a static 1 KB JSON when installed,
else the bundled asyncio server of benchmarks/profiles.py) and one ``python -m gateway run`` per
configuration, each on its own port with the passthrough profile's config (GET 1 KB, no policies;
benchmarks/profiles.py ``gateway_config``), differing only in ``workers:``

    workers: 1      one process serves (no supervisor);
    workers: auto   a supervisor forks one worker per core it may run on; the workers share the
                    port with SO_REUSEPORT, so the kernel spreads connections over them;
    --workers N,..  any explicit counts besides (``--workers 1,2,4``: workers: 2 and 4 too).

Load: wrk (else the bundled aiohttp generator) with --connections keep-alive connections
(default 64, enough to keep several workers busy) for --seconds per run. After a warm-up of every
configuration, the rounds alternate them (1, auto, ..., 1, auto, ...), so each configuration's
ratio to workers: 1 compares runs of the same round. With 4 cores or more (and taskset), wrk and
the upstream get half the cores and the gateways the other half; with fewer nothing can be pinned
apart and everything shares every core: then workers: auto competes with wrk, the upstream and the
kernel's loopback work for the same cores, and its ratio to workers: 1 is bounded by what they
leave it, not by the number of workers.

Per run, from /proc: req/s, p50/p99; the gateway's CPU (supervisor + every worker) per request and
in cores (CPU seconds per second of the run), each process's share; the resident memory of every
process (RSS; and PSS, which counts the pages forked workers share once); the CPU the load
generator took (it is this process's child: the kernel adds its user + system time to this
process's children times when run_load reaps it, read with getrusage) and the upstream's (nginx
master + worker); every core's busy and softirq time (/proc/stat), and what is left, other
processes on the machine (noise: the machine may be shared). The table gives medians with
(min–max) over the rounds; "vs 1" is a configuration's req/s over workers: 1's in the same round.
Every run goes to benchmarks/results/workers-<timestamp>.json, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    log_findings,
    machine,
    memory,
    new_report,
    nginx_errors,
    process_tree,
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

PROFILE = "passthrough"
BASELINE = "1"  # the configuration every other is compared with, round by round
MIN_CORES_TO_PIN = 4  # below this, pinning wrk and the upstream apart would leave the workers too few cores
QUIET = 0.05  # a run is quiet when other processes took under this share of the machine


def configurations(option: str) -> list[str]:
    """The ``workers:`` values to measure: "1", "auto", then those of --workers (1, auto not twice)."""
    values = [BASELINE, "auto"]
    for part in (p.strip().lower() for p in option.split(",")):
        if not part:
            continue
        if part != "auto" and not (part.isdigit() and int(part) >= 1):
            raise ValueError(f"--workers: {part!r} is neither a number of processes (1 or more) nor 'auto'")
        value = part if part == "auto" else str(int(part))
        if value not in values:
            values.append(value)
    return values


def plan() -> tuple[list[int] | None, list[int] | None]:
    """(load cores, gateway cores), or (None, None) when there are too few cores to pin apart."""
    return cpu_plan() if len(os.sched_getaffinity(0)) >= MIN_CORES_TO_PIN else (None, None)


def worker_count(value: str) -> int:
    """What the gateway makes of ``workers: value``: auto is one per core it may run on (its
    affinity: the gateway cores when pinned, else every core here)."""
    if value != "auto":
        return int(value)
    return len(plan()[1] or os.sched_getaffinity(0))


def label(value: str) -> str:
    return f"workers: auto ({worker_count(value)})" if value == "auto" else f"workers: {value}"


def pss_bytes(pid: int) -> int | None:
    """Proportional set size of one process (shared pages divided among their users), from /proc."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None


def children_cpu() -> float:
    """User + system CPU of this process's children that have ended and been reaped (the load runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def listening_pids(text: str) -> set[int]:
    """The processes whose "gateway listening" record is in a gateway's log."""
    pids = set()
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("message") == "gateway listening" and "pid" in record:
            pids.add(int(record["pid"]))
    return pids


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def start_gateways(processes: Processes, scratch: Path, cores: list[int] | None, values: list[str], upstream_port: int, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One gateway per configuration, every worker listening: {value: {"process", "port", "name"}}."""
    gateways: dict[str, dict[str, Any]] = {}
    for value in values:
        port = free_port()
        config = P.gateway_config(PROFILE, port, upstream_port, 0, "", None)
        config["workers"] = value if value == "auto" else int(value)
        name = f"gateway-w{value}"
        path = scratch / f"{name}.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        report["configs"][value] = config
        process = processes.start(name, [sys.executable, "-m", "gateway", "run", "-c", str(path)], cores, cwd=ROOT)
        gateways[value] = {"process": process, "port": port, "name": name}
    for value, gateway in gateways.items():
        wait_for_port(gateway["port"], gateway["process"], processes, gateway["name"], timeout=30)
        wanted = worker_count(value)
        deadline = time.monotonic() + 30
        while len(listening_pids(processes.log_text(gateway["name"]))) < wanted:
            if gateway["process"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{label(value)}: {len(listening_pids(processes.log_text(gateway['name'])))} of {wanted} workers listening "
                    f"(exit {gateway['process'].poll()}):\n{processes.log_text(gateway['name'])[-3000:]}"
                )
            time.sleep(0.1)
        tree = process_tree(gateway["process"].pid)
        gateway["pids"] = tree
        say(f"{label(value)} on :{gateway['port']}: {len(tree)} process(es) ({'supervisor + ' if len(tree) > 1 else ''}{wanted} serving)")
    return gateways


def run(args: argparse.Namespace) -> dict[str, Any]:
    cores = sorted(os.sched_getaffinity(0))
    load_cores, gateway_cores = plan()
    if load_cores:
        pinning = (
            f"pinned: wrk and the upstream on cores {load_cores}, the gateways on {gateway_cores} "
            f"(workers: auto = {worker_count('auto')} workers, one per core they may run on)"
        )
    else:
        pinning = (
            f"not pinned: this machine has {len(cores)} core(s), so nothing can be pinned apart: wrk, the upstream, the kernel's "
            f"loopback work and every gateway worker share all cores (workers: auto = {worker_count('auto')} workers competes with them)"
        )
    scratch = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    scratch.chmod(0o755)  # nginx's workers (nobody, when started as root) read files in here
    processes = Processes(scratch)
    environment = {
        **machine(),
        **load_environment(load_cores),
        "gateway_cores": gateway_cores,
        "pinning": pinning,
        "nginx": version([NGINX, "-v"]) if os.path.exists(NGINX) else None,
        "auto_workers": worker_count("auto"),
    }
    report = new_report(
        "workers", args, environment,
        configurations={value: {"label": label(value), "workers": worker_count(value)} for value in args.configurations},
        configs={}, checks={}, runs=[],
    )  # fmt: skip
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        say(f"scratch {scratch}; load: {load_tool()} -t1 -c{args.connections}; {pinning}")
        upstream, upstream_port, _ = P.start_upstream(processes, scratch, load_cores, report)
        say(f"upstream ({report['environment']['upstream']}) on :{upstream_port}")
        gateways = start_gateways(processes, scratch, gateway_cores, args.configurations, upstream_port, report)

        path = P.PROFILES[PROFILE].path
        for value, gateway in gateways.items():
            status, _, body = get(f"http://127.0.0.1:{gateway['port']}{path}")
            report["checks"][value] = {"status": status, "bytes": len(body)}
            say(f"check {label(value)}: {status}, {len(body)} bytes")
            if status != 200 or len(body) != 1024:
                raise RuntimeError(f"{label(value)} answered {status} with {len(body)} bytes (expected 200 with 1024): {body[:300]!r}")
        ncpu = os.cpu_count() or 1

        def measure(value: str, phase: str, round_: int | None, seconds: float) -> dict[str, Any]:
            gateway = gateways[value]
            supervisor = gateway["process"].pid
            pids = process_tree(supervisor)
            workers = [pid for pid in pids if pid != supervisor] or [supervisor]

            def snapshot() -> dict[str, Any]:
                return {
                    "gateway": tree_cpu_seconds(supervisor),
                    "workers": {pid: tree_cpu_seconds(pid) for pid in workers},
                    "upstream": tree_cpu_seconds(upstream.pid),
                    "load": children_cpu(),
                    "cores": core_times(None),
                    "clock": time.monotonic(),
                }

            before = snapshot()
            result = run_load(processes, f"http://127.0.0.1:{gateway['port']}{path}", seconds, args.connections, load_cores, name="load")
            after = snapshot()
            ended = time.time()
            pids_after = process_tree(supervisor)
            window = after["clock"] - before["clock"]
            requests = result["requests"]
            gateway_cpu = after["gateway"] - before["gateway"]
            worker_cpu = {pid: after["workers"][pid] - before["workers"][pid] for pid in workers}
            load_cpu = after["load"] - before["load"]
            upstream_cpu = after["upstream"] - before["upstream"]
            busy = after["cores"]["busy"] - before["cores"]["busy"]
            softirq = after["cores"]["softirq"] - before["cores"]["softirq"]
            worker_rss = [memory(pid)["rss_bytes"] for pid in workers]
            total = memory(supervisor)
            pss = [pss_bytes(pid) for pid in pids_after]
            entry = {
                "configuration": value, "label": label(value), "workers": worker_count(value), "phase": phase, "round": round_, "ended": ended,
                **result,
                "window_s": window,
                "processes": len(pids_after),
                "respawned": sorted(set(pids) ^ set(pids_after)),
                # CPU seconds per second of the run (1.0 = one core busy all along).
                "gateway_cpu_s": gateway_cpu,
                "gateway_cores": gateway_cpu / window,
                "cpu_us_per_request": gateway_cpu / requests * 1e6 if requests else None,
                "worker_cpu_s": {str(pid): cpu for pid, cpu in worker_cpu.items()},
                "supervisor_cpu_s": gateway_cpu - sum(worker_cpu.values()) if supervisor not in workers else None,
                "loadgen_cpu_s": load_cpu, "loadgen_cores": load_cpu / window,
                "upstream_cpu_s": upstream_cpu, "upstream_cores": upstream_cpu / window,
                "busy_cores": busy / window, "softirq_cores": softirq / window,
                "others_cores": max(busy - softirq - gateway_cpu - load_cpu - upstream_cpu, 0.0) / window,
                "machine_cores": ncpu,
                "worker_rss_bytes": worker_rss,
                "supervisor_rss_bytes": total["rss_bytes"] - sum(worker_rss) if supervisor not in workers else None,
                "rss_bytes": total["rss_bytes"], "peak_rss_bytes": total["peak_rss_bytes"],
                "pss_bytes": sum(p for p in pss if p is not None) if all(p is not None for p in pss) else None,
                "loadavg": Path("/proc/loadavg").read_text().split()[0],
            }
            if phase == "round" and value != BASELINE:
                base = next((r for r in report["runs"] if r["phase"] == "round" and r["round"] == round_ and r["configuration"] == BASELINE), None)
                entry["ratio_to_1"] = result["rps"] / base["rps"] if base and base["rps"] else None
            report["runs"].append(entry)
            lat = result["latency_us"]
            errors = {k: v for k, v in result["errors"].items() if v and k != "status"}
            split = "/".join(f"{cpu / gateway_cpu:.0%}" for cpu in worker_cpu.values()) if gateway_cpu and len(workers) > 1 else ""
            mb = 2**20
            rss_text = (
                f"RSS {'+'.join(f'{r / mb:.0f}' for r in worker_rss)} MB"
                + (f" + supervisor {entry['supervisor_rss_bytes'] / mb:.0f} MB = {total['rss_bytes'] / mb:.0f} MB" if entry["supervisor_rss_bytes"] is not None else "")
                + (f" (PSS {entry['pss_bytes'] / mb:.0f} MB)" if entry["pss_bytes"] is not None else "")
            )
            say(
                f"{phase}{'' if round_ is None else f' {round_}/{args.rounds}'} {label(value):<17}: {result['rps']:>7,.0f} req/s, "
                f"p50 {fmt_ms(lat['p50'])} ms, p99 {fmt_ms(lat['p99'])} ms, {entry['cpu_us_per_request'] or 0:.0f} CPU µs/req, "
                f"gateway {entry['gateway_cores']:.2f} cores{f' (workers {split})' if split else ''}, {rss_text}; "
                f"{load_tool()} {entry['loadgen_cores']:.2f}, upstream {entry['upstream_cores']:.2f}, softirq {entry['softirq_cores']:.2f}, "
                f"others {entry['others_cores']:.2f} of {ncpu} cores"
                + (f"; x{entry['ratio_to_1']:.2f} workers: 1" if entry.get("ratio_to_1") else "")
                + (f"; statuses {statuses_text(result['statuses'])}" if set(result["statuses"]) != {"200"} else "")
                + (f", socket errors {errors}" if errors else "")
            )
            return entry

        for value in args.configurations:
            measure(value, "warmup", None, args.warmup)
        for round_ in range(1, args.rounds + 1):
            for value in args.configurations:
                measure(value, "round", round_, args.seconds)

        load_ends = [r["ended"] for r in report["runs"]]
        for value, gateway in gateways.items():
            text = processes.log_text(gateway["name"])
            report["findings"] += log_findings(f"w{value}", text, load_ends)
            report.setdefault("gateway_logs", {})[value] = text[-3000:]
        report["findings"] += nginx_errors(scratch / "nginx-upstream-error.log")
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
    for value in report["configurations"]:
        mine = [r for r in measured if r["configuration"] == value]
        if not mine:
            continue
        statuses = summed_counts(r["statuses"] for r in mine)
        ratios = [r["ratio_to_1"] for r in mine if r.get("ratio_to_1")] if value != BASELINE else [1.0] * len(mine)
        base_cpu = {r["round"]: r["cpu_us_per_request"] for r in measured if r["configuration"] == BASELINE}
        cpu_ratios = [r["cpu_us_per_request"] / base_cpu[r["round"]] for r in mine if r["cpu_us_per_request"] and base_cpu.get(r["round"])]
        # Rounds where other processes on the machine took under QUIET of it, in this run and in workers: 1's.
        quiet_limit = QUIET * (report["environment"]["cpu_count"] or 1)
        base_quiet = {r["round"] for r in measured if r["configuration"] == BASELINE and r["others_cores"] < quiet_limit}
        quiet = [(r["round"], r["ratio_to_1"] if value != BASELINE else 1.0) for r in mine if r["round"] in base_quiet and r["others_cores"] < quiet_limit]
        summary[value] = {
            "label": label(value),
            "workers": worker_count(value),
            "processes": max(r["processes"] for r in mine),
            "runs": len(mine),
            "requests": sum(r["requests"] for r in mine),
            "rps": spread([r["rps"] for r in mine]),
            "p50_ms": statistics.median(r["latency_us"]["p50"] for r in mine) / 1000,
            "p99_ms": statistics.median(r["latency_us"]["p99"] for r in mine) / 1000,
            "max_latency_ms": max(r["latency_us"]["max"] for r in mine) / 1000,
            "cpu_us_per_request": spread([r["cpu_us_per_request"] for r in mine if r["cpu_us_per_request"] is not None]),
            "gateway_cores": statistics.median(r["gateway_cores"] for r in mine),
            "loadgen_cores": statistics.median(r["loadgen_cores"] for r in mine),
            "upstream_cores": statistics.median(r["upstream_cores"] for r in mine),
            "softirq_cores": statistics.median(r["softirq_cores"] for r in mine),
            "others_cores": spread([r["others_cores"] for r in mine]),
            "busy_cores": statistics.median(r["busy_cores"] for r in mine),
            "worker_rss_mb": statistics.median(statistics.fmean(r["worker_rss_bytes"]) for r in mine) / 2**20,
            "worker_rss_mb_each": [b / 2**20 for b in mine[-1]["worker_rss_bytes"]],
            "supervisor_rss_mb": statistics.median(r["supervisor_rss_bytes"] for r in mine) / 2**20 if mine[0]["supervisor_rss_bytes"] is not None else None,
            "rss_mb": statistics.median(r["rss_bytes"] for r in mine) / 2**20,
            "pss_mb": statistics.median(r["pss_bytes"] for r in mine) / 2**20 if all(r["pss_bytes"] is not None for r in mine) else None,
            "ratio_to_1": {"per_round": ratios, **spread(ratios)},
            "cpu_ratio_to_1": {"per_round": cpu_ratios, **spread(cpu_ratios)},
            "ratio_to_1_quiet": {"rounds": [n for n, _ in quiet], "per_round": [x for _, x in quiet if x], **spread([x for _, x in quiet if x])},
            "statuses": dict(sorted(statuses.items())),
            "socket_errors": {k: sum(r["errors"][k] for r in mine) for k in ("connect", "read", "write", "timeout")},
        }
    return summary


def check(report: dict[str, Any]) -> list[str]:
    """What does not look as it should, after the runs."""
    findings = []
    summary = report["summary"]
    ncpu = report["environment"]["cpu_count"] or 1
    for value, row in summary.items():
        name = row["label"]
        expected = row["workers"] + (1 if row["workers"] > 1 else 0)
        if row["processes"] != expected:
            findings.append(f"{name}: {row['processes']} gateway processes where {expected} were expected")
        if set(row["statuses"]) - {"200"}:
            findings.append(f"{name}: statuses other than 200: {row['statuses']}")
        if any(row["socket_errors"].values()):
            findings.append(f"{name}: socket errors {row['socket_errors']}")
        if row["max_latency_ms"] > 1000:
            findings.append(f"{name}: a request took {row['max_latency_ms'] / 1000:.2f}s")
        if row["loadgen_cores"] > 0.9:
            findings.append(
                f"{name}: the load generator took {row['loadgen_cores']:.2f} cores: its single thread (run_load starts wrk with -t1) "
                "may be what limits req/s here, not the gateway"
            )
        if row["upstream_cores"] > 0.9:
            findings.append(f"{name}: the upstream took {row['upstream_cores']:.2f} cores (nginx runs one worker): it may be the limit")
        if value != BASELINE and row["ratio_to_1"].get("median", 1.0) < 1.0:
            findings.append(
                f"{name}: {row['ratio_to_1']['median']:.2f}x the req/s of workers: 1 (median over rounds; no gain), with other processes "
                f"taking a median {row['others_cores']['median']:.2f} cores of its runs"
            )
    for r in report["runs"]:
        if r["respawned"]:
            findings.append(f"{r['label']} {r['phase']} {r['round'] or ''}: gateway processes changed during the run {r['respawned']} (a worker died?)")
    noisy = [r for r in report["runs"] if r["phase"] == "round" and r["others_cores"] >= QUIET * ncpu]
    if noisy:
        worst = max(noisy, key=lambda r: r["others_cores"])
        findings.append(
            f"other processes on the machine took {QUIET:.0%} or more of its {ncpu} cores during {len(noisy)} of "
            f"{sum(1 for r in report['runs'] if r['phase'] == 'round')} measured runs (worst: {worst['label']} round {worst['round']}, "
            f"{worst['others_cores']:.2f} cores, load average {worst['loadavg']}): req/s is noisy; CPU µs/req is the steadiest figure"
        )
    return findings


def table(report: dict[str, Any]) -> str:
    summary, env, args = report["summary"], report["environment"], report["args"]
    lines = [
        f"{'configuration':<18} {'procs':>5} {'req/s':>7} {'(min–max)':>17} {'p50 ms':>6} {'p99 ms':>6} {'CPU µs/req':>10} "
        f"{'RSS MB/worker':>13} {'RSS MB total':>12} {'PSS MB total':>12} {'gateway':>7} {env['load_tool']:>7} {'upstream':>8} {'softirq':>7} {'others':>6} {'busy':>5}  {'vs 1 (min–max)':<20}",
    ]
    for value, row in summary.items():
        rps, cpu, ratio = row["rps"], row["cpu_us_per_request"], row["ratio_to_1"]
        span = f"({rps['min']:,.0f}–{rps['max']:,.0f})"
        total = f"{row['rss_mb']:.0f}" + (f" (sup {row['supervisor_rss_mb']:.0f})" if row["supervisor_rss_mb"] is not None else "")
        pss = "-" if row["pss_mb"] is None else f"{row['pss_mb']:.0f}"
        vs = "1.00" if value == BASELINE else (f"{ratio['median']:.2f} ({ratio['min']:.2f}–{ratio['max']:.2f})" if "median" in ratio else "-")
        lines.append(
            f"{row['label']:<18} {row['processes']:>5} {rps['median']:>7,.0f} {span:>17} {row['p50_ms']:>6.2f} {row['p99_ms']:>6.2f} {cpu.get('median', 0):>10.0f} "
            f"{row['worker_rss_mb']:>13.1f} {total:>12} {pss:>12} "
            f"{row['gateway_cores']:>7.2f} {row['loadgen_cores']:>7.2f} {row['upstream_cores']:>8.2f} {row['softirq_cores']:>7.2f} {row['others_cores']['median']:>6.2f} "
            f"{row['busy_cores']:>5.2f}  {vs:<20}"
        )
    lines.append("")
    lines.append(
        f"gateway, {env['load_tool']}, upstream, softirq, others, busy: CPU seconds per second of the run, in cores (the machine has "
        f"{env['cpu_count']}): the gateway's supervisor + workers, the load generator, the upstream ({env.get('upstream')}: master + worker), "
        "the kernel's softirq work (loopback networking, charged to no process), other processes on the machine, and every core's busy time"
    )
    lines.append(
        "CPU µs/req: the gateway's CPU (supervisor + all workers) per request; RSS MB/worker: the mean over the workers (workers: 1: "
        "the one process); RSS total counts the pages forked workers share once per process, PSS splits them; /proc, 10 ms ticks; "
        "medians over the rounds; vs 1: req/s over workers: 1's in the same round, median (min–max)"
    )
    for value, row in summary.items():
        quiet = row["ratio_to_1_quiet"]
        if value == BASELINE:
            continue
        if quiet["rounds"]:
            per_round = ", ".join(f"round {n} x{x:.2f}" for n, x in zip(quiet["rounds"], quiet["per_round"]))
            lines.append(f"{row['label']} vs 1 in quiet rounds (other processes under {QUIET:.0%} of the machine in both runs): {per_round}")
        else:
            lines.append(f"{row['label']} vs 1 in quiet rounds (other processes under {QUIET:.0%} of the machine in both runs): no such round")
    lines.append(
        f"load: {env['load_tool']} -t1 -c{args['connections']} {args['seconds']:g}s x {args['rounds']} rounds, warm-up {args['warmup']:g}s "
        f"per configuration, loopback, upstream {env.get('upstream')}; {env['pinning']}"
    )
    if env["load_cores"] is None:
        lines.append(
            f"note: with {env['cpu_count']} cores shared by everything, workers: auto can take only the cores wrk, the upstream and the kernel "
            "leave it: its ratio to workers: 1 shows that, not what it would reach with cores of its own"
        )
    if env["load_tool"] != "wrk":
        lines.append("note: without wrk (apt-get install wrk) the bundled aiohttp load generator saturates long before several workers do")
    lines += findings_lines(report, "statuses, worker counts and gateway logs as expected")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=(__doc__ or "").splitlines()[0])
    load_options(
        parser, seconds=3.0, warmup=2.0,
        rounds_help="rounds over the configurations (default 3; --quick 2)",
        warmup_help="warm-up load per configuration (default 2; --quick 1)",
        keep_help="keep the scratch folder (configs, logs)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="well under a minute: 2 s runs, 2 rounds, 1 s warm-up")
    parser.add_argument("--workers", default="", help="worker counts to measure besides 1 and auto, comma-separated (e.g. 2,4)")
    parser.set_defaults(seconds=None, rounds=None, warmup=None, connections=64)
    args = parser.parse_args()
    args.seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 3.0)
    args.rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    if args.connections < 1:
        parser.error("--connections must be at least 1")
    try:
        args.configurations = configurations(args.workers)
    except ValueError as exc:
        parser.error(str(exc))
    runs = len(args.configurations) * (args.rounds + 1)
    estimate = len(args.configurations) * (args.warmup + args.rounds * args.seconds) + runs * 0.3 + 5
    say(f"{len(args.configurations)} configurations ({', '.join(label(v) for v in args.configurations)}), {runs} load runs, about {estimate:.0f}s")
    report, out = run_and_save("workers", run, args, parser)
    print()
    print(table(report))
    print(f"\nevery run: {out.relative_to(ROOT)}  (total {elapsed():.0f}s)")


if __name__ == "__main__":
    main()
