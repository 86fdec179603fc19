"""The public HTTP caching test suite (cache-tests.fyi) through the gateway's cache, nginx and Varnish.

    python -m benchmarks.cache_conformance [--targets gateway,nginx,varnish] [--redis]
                                           [--json OUT.json] [--id TEST_ID] [--keep]

Everything runs on loopback and is started (and stopped) here. The suite, npm package
``http-cache-tests`` 0.4.5, is installed by npm into a folder under ~/.cache/gateway-benchmarks
(once); its origin server (``server/server.mjs``, held to 127.0.0.1) runs on a free port, and its
command-line client (``cli.mjs``) sends every test's requests through each target in turn:

- gateway: ``python -m gateway run`` with one route ``/`` to the origin and the ``cache`` policy
  honouring the origin's headers (:data:`CACHE`: ``ttl: 0``, RFC 9111's heuristic freshness,
  ``stale_if_error``), no other policy; no retries and no passive health, since the origin answers 5xx and closes connections
  on purpose, and idle upstream connections closed before Node's own keep-alive timeout. The
  embedded memory store, or with ``--redis`` a redis-server on a free port.
- nginx: ``proxy_cache`` with ``proxy_cache_revalidate on``, as the suite's docker/nginx/nginx.conf.
- varnish: ``varnishd -F`` with the built-in VCL and the suite's docker/serve.sh parameters
  (``default_ttl=0``, ``default_grace=0``, ``default_keep=3600``).

Results are read as the suite's lib/display.mjs reads them: a required test passes or fails; an
"optimal" test passes or is not optimal (a missed reuse, not a conformance problem); a "check"
test is informational (yes / no); a test whose setup step failed, whose request was retried by
the cache, or that depends on a test that did not pass is counted apart. nginx and Varnish are
also set beside the suite's own published runs of them (results/*.json in the package): the same
results say this harness runs the suite as its authors do. A table goes to the terminal, with
every test the gateway does not pass; every result, per target and test id, to
benchmarks/results/cache-conformance-<timestamp>.json (or ``--json``). ``--id`` runs one test
through each target and prints the client's and the origin's view of every request instead.
A run of the three targets takes about 50 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.common import (
    NGINX,
    RESULTS,
    ROOT,
    Processes,
    elapsed,
    free_port,
    interrupt,
    new_report,
    say,
    tear_down,
    version,
    wait_for_port,
)

SUITE = "http-cache-tests"
SUITE_VERSION = "0.4.5"
SUITE_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gateway-benchmarks" / f"{SUITE}-{SUITE_VERSION}"
VARNISHD = "/usr/sbin/varnishd"
TARGETS = ("gateway", "nginx", "varnish")
INSTALL_TIMEOUT = 300.0
SUITE_TIMEOUT = 300.0  # one full pass takes ~20 s against the origin alone
ONE_TEST_TIMEOUT = 60.0

# The gateway's route: the upstream's headers decide (no override). ttl 0: no freshness the
# origin did not give, except RFC 9111's heuristic (10% of the time since Last-Modified); stale
# entries answer for an hour when the origin fails, where its directives allow it.
CACHE = {"ttl": 0, "heuristic": True, "stale_if_error": "1h"}

# The suite's result kinds (lib/display.mjs), in the order the table shows them.
OUTCOMES = {
    "pass": "passed",
    "fail": "failed",
    "optional_fail": "not optimal",
    "yes": "info yes",
    "no": "info no",
    "setup_fail": "setup",
    "retry": "retry",
    "harness_fail": "harness",
    "dependency_fail": "dependency",
    "untested": "untested",
}
NOT_PASSED = ("fail", "optional_fail", "setup_fail", "retry", "harness_fail", "dependency_fail", "untested", "no")

# server.mjs listens on every interface; this preload holds a bare-port listen() to 127.0.0.1.
LOOPBACK_JS = """\
const net = require('net')
const listen = net.Server.prototype.listen
net.Server.prototype.listen = function (port, ...rest) {
  if (/^[0-9]+$/.test(String(port)) && typeof rest[0] !== 'string') return listen.call(this, Number(port), '127.0.0.1', ...rest)
  return listen.call(this, port, ...rest)
}
"""

# The tests cli.mjs runs (tests/index.mjs and surrogate-control.mjs) and the suite's own published
# runs (results/index.mjs), as one JSON line.
LIST_TESTS_JS = """\
const base = process.argv[1]
const tests = (await import(`${base}/tests/index.mjs`)).default
tests.push((await import(`${base}/tests/surrogate-control.mjs`)).default)
const out = []
for (const suite of tests) {
  for (const test of suite.tests) {
    if (test.browser_only === true) continue
    out.push({ id: test.id, name: test.name, suite: suite.name, kind: test.kind || 'required', depends_on: test.depends_on || [] })
  }
}
const published = (await import(`${base}/results/index.mjs`)).default.map(run => ({ file: run.file, version: run.version }))
console.log(JSON.stringify({ tests: out, published }))
"""




# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------


def suite_folder() -> Path:
    """The installed package (npm, once): its folder."""
    folder = SUITE_CACHE / "node_modules" / SUITE
    marker = SUITE_CACHE / ".installed"
    if marker.exists():
        return folder
    if not shutil.which("node") or not shutil.which("npm"):
        raise RuntimeError("node and npm are needed to run the suite (apt-get install nodejs npm)")
    SUITE_CACHE.mkdir(parents=True, exist_ok=True)
    (SUITE_CACHE / "package.json").write_text('{"private": true}\n')
    say(f"npm install {SUITE}@{SUITE_VERSION} into {SUITE_CACHE} (once)…")
    try:
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--no-package-lock", "--omit=dev", "--loglevel=error", f"{SUITE}@{SUITE_VERSION}"],
            cwd=SUITE_CACHE, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"npm install took over {INSTALL_TIMEOUT:g}s") from exc
    if done.returncode != 0:
        raise RuntimeError(f"npm install failed ({done.returncode}): {(done.stderr or done.stdout)[-1000:]}")
    marker.write_text(datetime.now().isoformat())
    return folder


def suite_tests(folder: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, str]]]:
    """Every test the client runs ({id: {name, suite, kind, depends_on}}) and the suite's published runs."""
    try:
        done = subprocess.run(
            ["node", "--no-warnings", "--input-type=module", "-e", LIST_TESTS_JS, folder.as_uri()],
            capture_output=True, text=True, timeout=30, check=True,
        )
    except subprocess.SubprocessError as exc:
        raise RuntimeError(f"the suite's tests could not be listed from {folder}: {exc}") from exc
    found = json.loads(done.stdout)
    return {test.pop("id"): test for test in found["tests"]}, found["published"]


def start_origin(processes: Processes, folder: Path) -> int:
    preload = processes.scratch / "loopback.cjs"
    preload.write_text(LOOPBACK_JS)
    port = free_port()
    # server.mjs reads its options from npm's environment (npm run server --port=N).
    env = {**os.environ, "npm_config_port": str(port), "npm_config_protocol": "http", "npm_config_pidfile": str(processes.scratch / "origin.pid")}
    process = processes.start("origin", ["node", "--require", str(preload), "server/server.mjs"], cwd=folder, env=env)
    wait_for_port(port, process, processes, "origin")
    return port


def run_client(folder: Path, base: str, test_id: str = "") -> subprocess.CompletedProcess[str]:
    """cli.mjs through ``base``: every test (JSON on stdout), or one test with its requests dumped."""
    # cli.mjs reads its options from npm's environment (npm run cli --base=URL --id=ID); an empty
    # id must be set, or it looks for a test named "undefined".
    env = {**os.environ, "npm_config_base": base, "npm_package_config_id": test_id}
    env.pop("npm_config_id", None)
    timeout = ONE_TEST_TIMEOUT if test_id else SUITE_TIMEOUT
    try:
        return subprocess.run(["node", "--no-warnings", "cli.mjs"], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"the suite's client did not finish within {timeout:g}s") from exc


def client_results(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        results = json.loads(done.stdout)
    except ValueError:
        results = None
    if done.returncode != 0 or not isinstance(results, dict):
        raise RuntimeError(f"the suite's client failed (exit {done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    return results


def outcome(tests: dict[str, dict[str, Any]], results: dict[str, Any], test_id: str) -> str:
    """The result kind of one test, as lib/display.mjs determineTestResult decides it."""
    result = results.get(test_id)
    if result is None:
        return "untested"
    test = tests[test_id]
    if any(outcome(tests, results, dependency) not in ("pass", "yes") for dependency in test["depends_on"]):
        return "dependency_fail"
    if isinstance(result, list) and result[0] == "Setup":
        return "retry" if result[1] == "retry" else "setup_fail"
    if result is False:
        return "harness_fail"
    passed = result is True
    if test["kind"] == "optimal":
        return "pass" if passed else "optional_fail"
    if test["kind"] == "check":
        return "yes" if passed else "no"
    return "pass" if passed else "fail"


def summarise(tests: dict[str, dict[str, Any]], results: dict[str, Any]) -> dict[str, Any]:
    outcomes = {test_id: outcome(tests, results, test_id) for test_id in tests}
    counts = {kind: sum(1 for found in outcomes.values() if found == kind) for kind in OUTCOMES}
    return {"total": len(tests), **counts, "outcomes": outcomes}


def against_published(folder: Path, published: list[dict[str, str]], tests: dict[str, dict[str, Any]], name: str, outcomes: dict[str, str]) -> dict[str, Any] | None:
    """This run of ``name`` beside the suite's own published run of it (results/<name>.json), if any:
    the same kinds for (almost) every test says the harness here runs the suite as its authors do."""
    run = next((run for run in published if run["file"] == f"{name}.json"), None)
    if run is None:
        return None
    theirs = summarise(tests, json.loads((folder / "results" / run["file"]).read_text()))["outcomes"]
    differ = {test_id: {"published": theirs[test_id], "here": found} for test_id, found in outcomes.items() if theirs[test_id] != found}
    return {"file": f"results/{run['file']}", "version": run["version"], "differ": differ}


# ---------------------------------------------------------------------------------------------
# The targets
# ---------------------------------------------------------------------------------------------


def gateway_config(port: int, origin_port: int, redis_port: int | None) -> dict[str, Any]:
    """One route to the origin, a plain proxy with the cache as the upstream's headers say."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port, "limits": {"drain_timeout": "1s"}},
        "workers": 1,
        "admin": False,
        # The origin answers 5xx and drops connections on purpose: a retry would be a second
        # request the suite reports as one, and an ejected target would fail every later test.
        # Idle connections are let go before Node's 5 s keep-alive timeout closes them under a
        # request (a PUT's streamed body cannot be sent again on a new connection).
        "upstreams": {
            "origin": {"targets": [f"http://127.0.0.1:{origin_port}"], "retries": 0, "keepalive_timeout": "4s", "health": {"passive": False}},
        },
        "routes": [{"name": "suite", "match": {"path": "/"}, "upstream": "origin", "cache": CACHE}],
        "logging": {"level": "info", "format": "json", "access_log": True},
    }
    if redis_port is not None:
        config["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout": "1s"}
    return config


def start_gateway(processes: Processes, origin_port: int, redis_port: int | None) -> tuple[int, str]:
    port = free_port()
    path = processes.scratch / "gateway.yaml"
    path.write_text(json.dumps(gateway_config(port, origin_port, redis_port), indent=2))  # JSON is YAML
    process = processes.start("gateway", [sys.executable, "-m", "gateway", "run", "-c", str(path)], cwd=ROOT)
    wait_for_port(port, process, processes, "gateway")
    return port, path.read_text()


def nginx_cache_config(scratch: Path, port: int, origin_port: int) -> Path:
    """The suite's docker/nginx/nginx.conf, with every path in ``scratch``."""
    (scratch / "nginx-temp").mkdir(exist_ok=True)  # nginx makes the last level of a path only
    text = f"""
worker_processes 1;
pid {scratch}/nginx.pid;
error_log {scratch}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {scratch}/nginx-access.log;
    client_body_temp_path {scratch}/nginx-temp/body;
    fastcgi_temp_path {scratch}/nginx-temp/fastcgi;
    uwsgi_temp_path {scratch}/nginx-temp/uwsgi;
    scgi_temp_path {scratch}/nginx-temp/scgi;
    proxy_temp_path {scratch}/nginx-temp/proxy;
    proxy_cache_path {scratch}/nginx-cache levels=1:2 keys_zone=suite:8m max_size=100m inactive=600m;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{origin_port};
            proxy_cache suite;
            proxy_cache_revalidate on;
        }}
    }}
}}
"""
    path = scratch / "nginx.conf"
    path.write_text(text)
    return path


def start_nginx(processes: Processes, origin_port: int) -> tuple[int, str]:
    port = free_port()
    scratch = processes.scratch
    config = nginx_cache_config(scratch, port, origin_port)
    process = processes.start("nginx", [NGINX, "-c", str(config), "-p", str(scratch), "-e", str(scratch / "nginx-error.log"), "-g", "daemon off;"])
    wait_for_port(port, process, processes, "nginx")
    return port, config.read_text()


def start_varnish(processes: Processes, origin_port: int) -> tuple[int, str]:
    port = free_port()
    command = [
        VARNISHD, "-F", "-a", f"127.0.0.1:{port}", "-b", f"127.0.0.1:{origin_port}", "-n", str(processes.scratch / "varnish"),
        "-s", "malloc,64m", "-T", "none", "-p", "default_ttl=0", "-p", "default_grace=0", "-p", "default_keep=3600",
    ]  # fmt: skip
    process = processes.start("varnish", command)
    wait_for_port(port, process, processes, "varnish")
    return port, " ".join(command)


def start_redis(processes: Processes) -> int:
    if shutil.which("redis-server") is None:
        raise RuntimeError("--redis needs redis-server (apt-get install redis-server)")
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(processes.scratch)]
    wait_for_port(port, processes.start("redis", command), processes, "redis")
    return port


def check_forwarding(base: str) -> None:
    """The origin's own 404 for an unknown state must come back through the target."""
    try:
        with urllib.request.urlopen(f"{base}/state/none", timeout=10) as response:  # noqa: S310 - loopback only
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError as exc:
        raise RuntimeError(f"{base} does not answer: {exc}") from exc
    if status != 404 or not body.startswith(b"State not found"):
        raise RuntimeError(f"{base} does not forward to the origin: {status} {body[:300]!r}")


def target_versions(redis: bool) -> dict[str, str]:
    found = {
        "node": version(["node", "--version"]),
        "nginx": version([NGINX, "-v"]),
        "varnish": version([VARNISHD, "-V"]),
    }
    if redis:
        found["redis_server"] = version(["redis-server", "--version"])
    return found


def start_target(name: str, processes: Processes, origin_port: int, redis: bool) -> tuple[int, str]:
    """Starts one target: (port, its config as text)."""
    if name == "gateway":
        return start_gateway(processes, origin_port, start_redis(processes) if redis else None)
    binary = NGINX if name == "nginx" else VARNISHD
    if not os.path.exists(binary):
        raise RuntimeError(f"{binary} is not installed (apt-get install {name})")
    if name == "nginx":
        return start_nginx(processes, origin_port)
    return start_varnish(processes, origin_port)


def stop_target(processes: Processes, count: int) -> None:
    """Stops what was started since ``count`` processes were running (the target and its Redis)."""
    while len(processes.running) > count:
        processes.stop(processes.running[-1][1])


def gateway_problems(log: str) -> list[str]:
    """The gateway's log records at warning level and above (a harness interaction shows here)."""
    found = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") in ("warning", "error", "critical"):
            found.append(line[:500])
    return found


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-cache-conformance-"))
    scratch.chmod(0o755)  # nginx's workers and Varnish's child run as other users when started as root
    processes = Processes(scratch)
    report = new_report("cache-conformance", args, target_versions(args.redis), suite=f"{SUITE}@{SUITE_VERSION}", tests={}, targets={})
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        folder = suite_folder()
        tests, published = suite_tests(folder)
        report["tests"] = tests
        origin_port = start_origin(processes, folder)
        say(f"scratch {scratch}; {SUITE} {SUITE_VERSION}: {len(tests)} tests; origin on :{origin_port}")
        for name in args.targets:
            try:
                entry = report["targets"][name] = run_target(name, processes, folder, tests, origin_port, args)
            except RuntimeError as exc:  # this target could not be tested; the others still are
                report["targets"][name] = {"error": str(exc)}
                say(f"{name}: {exc}")
                continue
            if "summary" in entry:
                entry["published"] = against_published(folder, published, tests, name, entry["summary"]["outcomes"])
    finally:
        tear_down(previous_term, processes, scratch, args.keep, report["findings"])
    report["seconds"] = round(elapsed(), 1)
    return report


def run_target(name: str, processes: Processes, folder: Path, tests: dict[str, dict[str, Any]], origin_port: int, args: argparse.Namespace) -> dict[str, Any]:
    """One target: started, checked, the suite run through it (or one test, with --id), stopped."""
    began = time.monotonic()
    running = len(processes.running)
    entry: dict[str, Any] = {}
    try:
        port, entry["config"] = start_target(name, processes, origin_port, args.redis)
        base = f"http://127.0.0.1:{port}"
        check_forwarding(base)
        if args.id:
            origin_log = len(processes.log_text("origin"))
            done = run_client(folder, base, args.id)
            entry["dump"] = done.stdout + done.stderr + "\n--- the origin's log ---\n" + processes.log_text("origin")[origin_log:]
        else:
            results = client_results(run_client(folder, base))
            entry["results"] = results
            entry["summary"] = summarise(tests, results)
    finally:
        if name == "gateway":
            entry["log_problems"] = gateway_problems(processes.log_text("gateway"))
        stop_target(processes, running)
    entry["seconds"] = round(time.monotonic() - began, 1)
    summary = entry.get("summary")
    say(f"{name}: {entry['seconds']:.0f}s" + (f", {summary['pass']} passed, {summary['fail']} failed of {summary['total']}" if summary else ""))
    return entry



# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    label = {"gateway": "gateway (redis)" if report["args"]["redis"] else "gateway (memory)"}
    lines = [f"{'target':<17} {'tests':>5} " + " ".join(OUTCOMES.values()) + f" {'seconds':>7}"]
    for name, entry in report["targets"].items():
        if "error" in entry:
            lines.append(f"{label.get(name, name):<17} not tested: {' '.join(entry['error'].split())[:300]}")
            continue
        summary = entry["summary"]
        counts = " ".join(f"{summary[kind]:>{len(text)}}" for kind, text in OUTCOMES.items())
        lines.append(f"{label.get(name, name):<17} {summary['total']:>5} {counts} {entry['seconds']:>7.0f}")
    lines += [
        "",
        "failed: a required test failed (a conformance problem); not optimal: an 'optimal' test failed (a missed reuse);",
        "info yes/no: 'check' tests (how the cache behaves, no right answer); setup: a test's setup step failed;",
        "retry: the cache retried a request; harness: the client recorded no result; dependency: a test this one",
        "depends on did not pass (all as the suite's lib/display.mjs reads them)",
        "",
    ]
    for name, entry in report["targets"].items():
        beside = entry.get("published")
        if beside:
            same = entry["summary"]["total"] - len(beside["differ"])
            differ = ", ".join(f"{test_id} ({kinds['published']} → {kinds['here']})" for test_id, kinds in beside["differ"].items())
            lines.append(f"{name} ({report['environment'][name]}): {same} of {entry['summary']['total']} tests as in the suite's published {beside['file']} ({beside['version']})" + (f"; differ: {differ}" if differ else ""))
    return "\n".join(lines)


def not_passed(report: dict[str, Any], name: str) -> str:
    """Every test ``name`` does not pass, grouped by result kind, with the suite's name and message."""
    entry = report["targets"][name]
    tests, results = report["tests"], entry["results"]
    lines = [f"{name}: tests not passed"]
    for kind in NOT_PASSED:
        ids = sorted(test_id for test_id, found in entry["summary"]["outcomes"].items() if found == kind)
        if not ids:
            continue
        lines.append(f"\n  {OUTCOMES[kind]} ({len(ids)}):")
        for test_id in ids:
            result = results.get(test_id)
            why = f"{result[0]}: {result[1]}" if isinstance(result, list) else ""
            if kind == "dependency_fail":
                why = "depends on " + ", ".join(f"{d} ({entry['summary']['outcomes'][d]})" for d in tests[test_id]["depends_on"])
            lines.append(f"    {test_id} — {tests[test_id]['name']}")
            if why:
                lines.append(f"        {why}")
    for line in entry.get("log_problems", [])[:20]:
        lines.append(f"  gateway log: {line}")
    return "\n".join(lines)


def save(report: dict[str, Any], path: Path | None) -> Path:
    if path is None:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"cache-conformance-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache_conformance", description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--redis", action="store_true", help="the gateway on a redis-server (started on a free port) instead of its memory store")
    parser.add_argument("--json", type=Path, default=None, help="write the results here instead of benchmarks/results/cache-conformance-<timestamp>.json")
    parser.add_argument("--id", default="", help="run this one test through each target and print its requests and responses")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (configs, logs)")
    args = parser.parse_args()
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not args.targets:
        parser.error(f"unknown target: {', '.join(unknown)} (known: {', '.join(TARGETS)})")
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
    if args.id:
        for name, entry in report["targets"].items():
            print(f"\n===== {name} =====\n{entry.get('dump') or entry.get('error')}")
        return
    out = save(report, args.json)
    print()
    print(table(report))
    if "results" in report["targets"].get("gateway", {}):
        print()
        print(not_passed(report, "gateway"))
    for finding in report["findings"]:
        print(f"finding: {finding}")
    print(f"\nevery result: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}  (total {report['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
