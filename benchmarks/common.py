"""What the benchmarks that serve over loopback share: processes, ports, nginx, a load generator.

Every process is started in its own session (process group) and registered with a
:class:`Processes`, whose ``close`` (run it in a ``finally``) stops each group with SIGTERM, then
SIGKILL, so nothing outlives a run, also on Ctrl-C or an exception.

Load comes from ``wrk`` when it is installed (with a small Lua script that also counts response
statuses), else from a bundled asyncio/aiohttp generator run as its own process
(``python -m benchmarks.common load URL SECONDS CONNECTIONS [SPEC.json]``, GETs or a rotation of
requests with bodies), which reports the same fields but saturates far sooner than wrk. The
upstream every runner starts is benchmarks/profiles.py ``start_upstream``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
NGINX = "/usr/sbin/nginx"
WRK = "/usr/bin/wrk"

# Counts the statuses of the responses and prints one JSON line at the end (latencies in µs).
WRK_SCRIPT = r"""
local threads = {}
statuses = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do counts[status] = (counts[status] or 0) + n end
  end
  local parts = {}
  for status, n in pairs(counts) do table.insert(parts, string.format('"%d":%d', status, n)) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d},"statuses":{%s}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), table.concat(parts, ",")))
end
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_plan() -> tuple[list[int] | None, list[int] | None]:
    """(load cores, server cores): two disjoint sets when taskset and 2+ cores exist, else (None, None)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or shutil.which("taskset") is None:
        return None, None
    half = len(cores) // 2
    return cores[:half], cores[half:]


def _taskset(cores: Sequence[int] | None) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cores))] if cores else []


class Processes:
    """The processes a benchmark started; ``close`` stops them all (newest first)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.running: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, command: Sequence[str], cores: Sequence[int] | None = None, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.scratch / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        process = subprocess.Popen(
            [*_taskset(cores), *command], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env=env, start_new_session=True,
        )
        self.running.append((name, process, log))
        return process

    def log_path(self, name: str) -> Path:
        return self.scratch / f"{name}.log"

    def log_text(self, name: str) -> str:
        try:
            return self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, process: subprocess.Popen[bytes], timeout: float) -> int:
        """Waits for a process that ends by itself (a load run); killed if it overstays."""
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(process)
            raise

    def stop(self, process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        for entry in list(self.running):
            if entry[1] is process:
                self.running.remove(entry)
                _stop_group(process, grace)
                entry[2].close()

    def close(self) -> None:
        while self.running:
            self.stop(self.running[-1][1])


def _stop_group(process: subprocess.Popen[bytes], grace: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    # The leader may be gone while others of its group live on (nginx's worker): end them too.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children still running (nginx's worker), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            pids += [int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    for each in pids:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def cores_busy(cores: Sequence[int] | None) -> float:
    """CPU seconds the given cores (all when None) have spent busy, from /proc/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    wanted = {f"cpu{core}" for core in cores} if cores else None
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not re.fullmatch(r"cpu\d+", name) or (wanted is not None and name not in wanted):
            continue
        numbers = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
        busy += sum(numbers) - numbers[3] - numbers[4]
    return busy / ticks


def nginx_errors(log: Path, levels: tuple[str, ...] = ("error", "crit", "alert", "emerg")) -> list[str]:
    """Findings from an nginx error log: its lines at these levels (at most ten)."""
    if not log.exists():
        return []
    serious = [line for line in log.read_text(errors="replace").splitlines() if any(f"[{level}]" in line for level in levels)]
    return [f"{log.name}: {line[:300]}" for line in serious[:10]]


def wait_for_port(port: int, process: subprocess.Popen[bytes], processes: Processes, name: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before listening:\n{processes.log_text(name)[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} is not listening on port {port} after {timeout:g}s:\n{processes.log_text(name)[-3000:]}")


def get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One plain GET (setup checks, not load)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# ---------------------------------------------------------------------------------------------
# The upstream
# ---------------------------------------------------------------------------------------------


def payload(size: int = 1024) -> bytes:
    """A JSON document of exactly ``size`` bytes."""
    head = b'{"items":[],"note":"'
    tail = b'"}\n'
    return head + b"x" * (size - len(head) - len(tail)) + tail


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def load_tool() -> str:
    return "wrk" if os.path.exists(WRK) else "aiohttp"


def load_environment(load_cores: Sequence[int] | None) -> dict[str, Any]:
    """The load side of a report's environment: the tool, its version and the cores it ran on."""
    return {
        "load_tool": load_tool(),
        "load_tool_version": version(["wrk", "-v"]) if load_tool() == "wrk" else "bundled aiohttp generator",
        "load_threads": 1,  # run_load starts wrk with -t1
        "load_cores": load_cores,
        "taskset": bool(shutil.which("taskset")),
    }


def run_load(
    processes: Processes, url: str, seconds: float, connections: int, cores: Sequence[int] | None, name: str = "load",
    script: Path | None = None, spec: Path | None = None,
) -> dict[str, Any]:
    """Drives ``url`` for ``seconds`` with keep-alive connections; requests, req/s, latencies, statuses.

    ``script``: a wrk Lua script to use instead of the status-counting GET one (it must print the
    same ``WRKJSON {...}`` line; extra keys are kept). ``spec``: for the aiohttp fallback, a JSON
    file of requests to rotate and a pattern to tally in responses (see :func:`aiohttp_load`).
    """
    if load_tool() == "wrk":
        if script is None:
            script = processes.scratch / "count.lua"
            if not script.exists():
                script.write_text(WRK_SCRIPT)
        command = [WRK, "-t1", f"-c{connections}", f"-d{max(int(round(seconds)), 1)}s", "--latency", "-s", str(script), url]
    else:
        command = [sys.executable, "-m", "benchmarks.common", "load", url, str(seconds), str(connections), *([str(spec)] if spec else [])]
    process = processes.start(name, command, cores, cwd=ROOT)
    code = processes.wait(process, seconds + 30)
    processes.stop(process)
    output = processes.log_text(name)
    found = re.search(r"^WRKJSON (\{.*\})$", output, re.MULTILINE)
    if code != 0 or not found:
        raise RuntimeError(f"the load generator failed (exit {code}):\n{output[-3000:]}")
    result = json.loads(found.group(1))
    result["statuses"] = {str(k): v for k, v in sorted(result["statuses"].items())}
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6) if result["duration_us"] else 0.0
    result["tool"] = load_tool()
    return result


def aiohttp_load(url: str, seconds: float, connections: int, spec_file: str | None = None) -> None:
    """The fallback load generator: ``connections`` keep-alive loops for ``seconds``; prints WRKJSON.

    ``spec_file`` (JSON, optional): ``{"requests": [{"method", "headers", "body_file"}, ...],
    "tally": REGEX}``: the requests are sent in rotation (default: one plain GET), and the groups
    ``REGEX`` finds in each response body, joined with ":", are counted into ``"tally"``.
    """
    import asyncio
    import itertools

    import aiohttp

    spec = json.loads(Path(spec_file).read_text()) if spec_file else {}
    rotation = [
        (r.get("method", "GET"), r.get("headers", {}), Path(r["body_file"]).read_bytes() if r.get("body_file") else None)
        for r in spec.get("requests", [])
    ] or [("GET", {}, None)]
    tally_pattern = re.compile(spec["tally"]) if spec.get("tally") else None
    turn = itertools.count()

    async def main() -> dict[str, Any]:
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        tally: dict[str, int] = {}
        errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
        received = 0
        connector = aiohttp.TCPConnector(limit=connections, force_close=False)
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)) as session:
            started = time.perf_counter()
            deadline = started + seconds

            async def worker() -> None:
                nonlocal received
                while (now := time.perf_counter()) < deadline:
                    method, headers, data = rotation[next(turn) % len(rotation)]
                    try:
                        async with session.request(method, url, headers=headers, data=data) as response:
                            body = await response.read()
                    except asyncio.TimeoutError:
                        errors["timeout"] += 1
                        continue
                    except aiohttp.ClientConnectorError:
                        errors["connect"] += 1
                        await asyncio.sleep(0.01)
                        continue
                    except aiohttp.ClientError:
                        errors["read"] += 1
                        continue
                    latencies.append(time.perf_counter() - now)
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    if response.status >= 400:
                        errors["status"] += 1
                    received += len(body)
                    if tally_pattern is not None:
                        found = tally_pattern.search(body.decode("utf-8", "replace"))
                        key = ":".join(group or "" for group in found.groups()) if found else "?"
                        tally[key] = tally.get(key, 0) + 1

            await asyncio.gather(*(worker() for _ in range(connections)))
            elapsed = time.perf_counter() - started
        latencies.sort()

        def percentile(p: float) -> int:
            return int(latencies[min(int(len(latencies) * p / 100), len(latencies) - 1)] * 1e6) if latencies else 0

        return {
            "requests": len(latencies), "duration_us": int(elapsed * 1e6), "bytes": received, "errors": errors,
            "latency_us": {
                "mean": round(statistics.fmean(latencies) * 1e6, 1) if latencies else 0.0, "max": percentile(100),
                "p50": percentile(50), "p75": percentile(75), "p90": percentile(90), "p99": percentile(99), "p999": percentile(99.9),
            },
            "statuses": {str(k): v for k, v in statuses.items()},
            **({"tally": tally} if tally_pattern is not None else {}),
        }

    try:
        import uvloop

        result = uvloop.run(main())
    except ImportError:
        result = asyncio.run(main())
    print("WRKJSON " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


STARTED = time.monotonic()  # when the benchmark began (its module imports this one first)


def say(text: str) -> None:
    """A progress line, stamped with the seconds since the benchmark began."""
    print(f"[{elapsed():5.1f}s] {text}", flush=True)


def elapsed() -> float:
    return time.monotonic() - STARTED


def interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler: end the run the way Ctrl-C does, through every finally."""
    raise KeyboardInterrupt


def tear_down(previous_term: Any, processes: "Processes | None", scratch: Path, keep: bool, findings: list[str]) -> None:
    """The end of every run: each process it started stops, any left running is a finding, and
    the scratch folder goes (unless kept)."""
    signal.signal(signal.SIGTERM, previous_term)
    if processes is not None:
        processes.close()
    leftovers = survivors(scratch)
    if leftovers:
        findings.append(f"processes still running after the stop: {leftovers}")
    if keep:
        say(f"kept {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


def fmt_ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def statuses_text(statuses: dict[str, int]) -> str:
    return " ".join(f"{code}:{count}" for code, count in statuses.items()) or "-"


def log_findings(name: str, text: str, load_ends: Sequence[float] = ()) -> list[str]:
    """Gateway log records worth a look (warnings, errors, Redis, circuit or fallback notes),
    grouped by level, message and exception; those within a second of the end of a load run (when
    the load tool closes its connections with requests in flight) are counted apart."""
    groups: dict[str, list[int]] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = {"level": "?", "message": line}
        level = str(record.get("level", "?"))
        message = str(record.get("message", ""))
        lowered = line.lower()
        if level not in ("warning", "error", "critical") and not any(word in lowered for word in ("circuit", "fallback", "on_failure", "redis", "traceback")):
            continue
        head, _, trace = message.partition("\n")
        exception = trace.strip().splitlines()[-1] if trace.strip() else ""
        at_end = 0
        try:
            when = datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00")).timestamp()
            at_end = int(any(abs(when - end) <= 1.0 for end in load_ends))
        except (KeyError, ValueError):
            pass
        extra = {k: v for k, v in record.items() if k not in ("time", "level", "logger", "message", "request_id")}
        key = (f"{level} {head!r}" + (f" ({exception})" if exception else "") + (f" {json.dumps(extra)}" if extra and not exception else ""))
        counts = groups.setdefault(key, [0, 0])
        counts[0] += 1
        counts[1] += at_end
    return [
        f"gateway-{name} log: {total}x {what}" + (f" — {at_end} of them as a load run ended" if at_end else "")
        for what, (total, at_end) in groups.items()
    ]


def machine() -> dict[str, Any]:
    """The machine the runs took place on."""
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "")
    except OSError:
        pass
    mem_total = None
    try:
        mem_total = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")), None)
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)),
        "memory_bytes": mem_total,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "loadavg_start": Path("/proc/loadavg").read_text().strip(),
    }


def summed_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Counts by key (statuses, Redis commands) added up over runs."""
    total: collections.Counter[str] = collections.Counter()
    for each in counts:
        total.update(each)
    return dict(total)


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def survivors(scratch: Path) -> list[str]:
    """Processes whose command line mentions the scratch folder (after ``close`` there should be none)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(scratch) in command:
                found.append(f"{entry}: {command.strip()[:120]}")
    return found


def version(command: list[str]) -> str:
    """The first line a program prints about its version ('' when it cannot be run)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else ""


def new_report(name: str, args: Any, environment: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """The head of every benchmark's JSON report (what ran, when, with which options, on which
    Python and CPUs, at which commit), then the benchmark's own sections, then its findings."""
    return {
        "benchmark": name,
        "started": datetime.now().isoformat(timespec="seconds"),
        "args": vars(args),
        "environment": {"python": sys.version.split()[0], "cpus": sorted(os.sched_getaffinity(0)), **environment},
        "git": git_state(),
        **sections,
        "findings": [],
    }


def git_state() -> dict[str, Any]:
    """The commit and the files that differ from it (the tree is measured as it is)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "changed": [line[3:] for line in git("status", "--porcelain").splitlines()]}



# ---------------------------------------------------------------------------------------------
# Process trees, memory, pinning, request rotations, Redis counters (used by ``python -m benchmarks``)
# ---------------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants still running (nginx's worker, a supervisor's workers), from /proc."""
    found, queue = [], [pid]
    while queue:
        each = queue.pop()
        if each in found or not os.path.exists(f"/proc/{each}"):
            continue
        found.append(each)
        try:
            for task in os.listdir(f"/proc/{each}/task"):
                queue += [int(child) for child in Path(f"/proc/{each}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and all its running descendants (see :func:`cpu_seconds` for one level)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for each in process_tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def memory(pid: int) -> dict[str, int]:
    """Resident memory of ``pid`` and its descendants, in bytes: now (VmRSS) and the peak (VmHWM), summed."""
    out = {"rss_bytes": 0, "peak_rss_bytes": 0, "processes": 0}
    for each in process_tree(pid):
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        out["processes"] += 1
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                out["rss_bytes"] += int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                out["peak_rss_bytes"] += int(line.split()[1]) * 1024
    return out


def core_times(cores: Sequence[int] | None) -> dict[str, float]:
    """CPU seconds the given cores (all when None) have spent per kind, from /proc/stat: ``busy``
    (everything but idle and iowait, as :func:`cores_busy`), and the ``softirq`` part of it (on
    loopback, most of the kernel's network work, which /proc/PID/stat charges to no process)."""
    ticks = os.sysconf("SC_CLK_TCK")
    wanted = {f"cpu{core}" for core in cores} if cores else None
    busy = softirq = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not re.fullmatch(r"cpu\d+", name) or (wanted is not None and name not in wanted):
            continue
        numbers = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
        busy += sum(numbers) - numbers[3] - numbers[4]
        softirq += numbers[6]
    return {"busy": busy / ticks, "softirq": softirq / ticks}


def move_to_cores(pid: int, cores: Sequence[int] | None) -> None:
    """Moves a process, its threads and its descendants to ``cores`` (no-op when None)."""
    if not cores:
        return
    for each in process_tree(pid):
        subprocess.run(["taskset", "-a", "-p", "-c", ",".join(map(str, cores)), str(each)], capture_output=True, check=False)


def _lua_string(value: str) -> str:
    return '"' + "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\' else f"\\{ord(ch):03d}" for ch in value) + '"'


def rotation_files(scratch: Path, name: str, path: str, requests: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """A wrk Lua script and an aiohttp-fallback spec that send ``requests`` in rotation to ``path``.

    Each request is ``{"method", "headers", "body_file"}`` (headers and body optional). The script
    counts statuses and prints the WRKJSON line as :data:`WRK_SCRIPT` does; pass both to
    :func:`run_load` (``script=``, ``spec=``).
    """
    lines = ["local rotation = {}", "local turn = 0", "function init(args)"]
    for request in requests:
        headers = ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in request.get("headers", {}).items())
        body = "nil"
        if request.get("body_file"):
            lines.append(f"  local f = assert(io.open({_lua_string(str(request['body_file']))}, 'rb')); local body = f:read('*a'); f:close()")
            body = "body"
        lines.append(f"  table.insert(rotation, wrk.format({_lua_string(request.get('method', 'GET'))}, {_lua_string(path)}, {{{headers}}}, {body}))")
    lines += ["end", "function request()", "  turn = turn % #rotation + 1", "  return rotation[turn]", "end"]
    script = scratch / f"{name}.lua"
    script.write_text(WRK_SCRIPT + "\n" + "\n".join(lines) + "\n")
    spec = scratch / f"{name}.json"
    spec.write_text(json.dumps({"requests": [
        {"method": r.get("method", "GET"), "headers": r.get("headers", {}), **({"body_file": str(r["body_file"])} if r.get("body_file") else {})}
        for r in requests
    ]}))
    return script, spec


def redis_snapshot(client: Any) -> dict[str, Any]:
    """One INFO call (a redis-py client): calls per command, those run inside scripts included, and
    Redis's socket reads (round trips) and writes."""
    info = client.execute_command("INFO", "stats", "commandstats")
    calls = {name[len("cmdstat_"):]: int(value["calls"]) for name, value in info.items() if name.startswith("cmdstat_") and name != "cmdstat_info"}
    return {"calls": calls, "reads": int(info["total_reads_processed"]), "writes": int(info["total_writes_processed"])}


def redis_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two snapshots, the later snapshot's own INFO call (1 read) taken out."""
    calls = {name: after["calls"].get(name, 0) - before["calls"].get(name, 0) for name in after["calls"]}
    calls = {name: n for name, n in sorted(calls.items()) if n}
    return {"commands": calls, "total": sum(calls.values()), "reads": max(after["reads"] - before["reads"] - 1, 0), "writes": max(after["writes"] - before["writes"] - 1, 0)}


if __name__ == "__main__":
    if len(sys.argv) in (5, 6) and sys.argv[1] == "load":
        aiohttp_load(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5] if len(sys.argv) == 6 else None)
    else:
        sys.exit("usage: python -m benchmarks.common load URL SECONDS CONNECTIONS [SPEC.json]")


# -- the command line and the results file, the same for every benchmark ------------------------

RESULTS = ROOT / "benchmarks" / "results"


def load_options(parser: Any, *, seconds: float, warmup: float, rounds_help: str, warmup_help: str, keep_help: str) -> None:
    """The options every load benchmark takes."""
    parser.add_argument("--seconds", type=float, default=seconds, help="length of each measured load run")
    parser.add_argument("--rounds", type=int, default=3, help=rounds_help)
    parser.add_argument("--warmup", type=float, default=warmup, help=warmup_help)
    parser.add_argument("--connections", type=int, default=32, help="concurrent keep-alive connections")
    parser.add_argument("--keep", action="store_true", help=keep_help)


def load_benchmark_main(name: str, doc: str, run: Any, table: Any, **options: Any) -> None:
    """The command line of a load benchmark: its options (load_options), the run, its table, and
    where the JSON went."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    load_options(parser, **options)
    args = parser.parse_args()
    report, out = run_and_save(name, run, args, parser)
    print()
    print(table(report))
    print(f"\nevery run: {out.relative_to(ROOT)}  (total {elapsed():.0f}s)")


def run_and_save(name: str, run: Any, args: Any, parser: Any) -> tuple[dict[str, Any], Path]:
    """Check the options, run the benchmark, write its JSON to benchmarks/results/; exit 130 on Ctrl-C."""
    if args.rounds < 1 or args.seconds < 1 or args.warmup < 1:
        parser.error("--rounds, --seconds and --warmup must be at least 1")
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
    return report, save_report(name, report)


def save_report(name: str, report: dict[str, Any]) -> Path:
    """benchmarks/results/<name>-<timestamp>.json (the folder ignores its JSON files)."""
    RESULTS.mkdir(exist_ok=True)
    ignore = RESULTS / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*.json\n")
    out = RESULTS / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return out


def findings_lines(report: dict[str, Any], none: str) -> list[str]:
    if not report["findings"]:
        return [f"findings: none ({none})"]
    return ["", "findings:", *(f"  - {finding}" for finding in report["findings"])]
