"""The command line: gateway run | check | warm | schema (CONFIG.md, "Command line")."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence, TextIO

from gateway import __version__
from gateway.config import DEFAULT_PATH, GatewayConfig, effective_blocks, json_schema_text, load_config
from gateway.errors import ConfigError

EXIT_CONFIG = 2


def default_path() -> str:
    return os.environ.get("GATEWAY_CONFIG", DEFAULT_PATH)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="A reverse-proxy security gateway for HTTP APIs.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "serve (reload with SIGHUP, drain and stop with SIGTERM)"),
        ("check", "validate the config and print every route with its effective policies"),
        ("warm", "fetch every route's warm list into the cache, with progress"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("-c", "--config", default=None, help=f"config file (default: $GATEWAY_CONFIG or ./{DEFAULT_PATH})")
    commands.add_parser("schema", help="print the JSON Schema of gateway.yaml")
    args = parser.parse_args(argv)

    if args.command == "schema":
        sys.stdout.write(json_schema_text())
        return 0
    path = args.config or default_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        try:
            describe(path, config, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # `gateway check | head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.command == "warm":
        import asyncio

        from gateway.server import warm_command

        return asyncio.run(warm_command(path, config, sys.stdout))
    from gateway.server import run  # imports uvloop and the server only when serving

    return run(path, config)


def describe(path: str, config: GatewayConfig, out: TextIO) -> None:
    """What `gateway check` prints: the listeners, then each route as it will serve."""
    from gateway.server import worker_count

    listen = config.listen
    admin = f"{config.admin.host}:{config.admin.port}" if config.admin else "off"
    out.write(f"{path}: OK — {len(config.routes)} route(s), {len(config.upstreams)} upstream(s)\n")
    redis = config.redis
    if redis is None:
        store = "memory (embedded, per process)"
    else:
        where = redis.url or (f"cluster {', '.join(redis.cluster_nodes)}" if redis.cluster_nodes else f"sentinel {redis.sentinel.master}")
        store = f"redis {where} (timeout {redis.timeout * 1000:g}ms, pool {redis.pool_size}, on_failure {redis.on_failure})"
    out.write(f"listen {listen.host}:{listen.port}  admin {admin}  workers {worker_count(config)}  store {store}\n")
    out.write("\nroutes (first match wins):\n")
    for index, route in enumerate(config.routes):
        match = route.match
        where = f"path {match.path}" if match.path is not None else f"path_regex {match.path_regex.pattern!r}"
        if match.host:
            where += f" host {match.host}"
        methods = ",".join(match.methods) if match.methods else "any method"
        upstream = config.upstreams[route.upstream]
        out.write(f"  [{index}] {route.name}: {methods} {where}\n")
        out.write(
            f"      upstream {route.upstream} → {', '.join(upstream.targets)} "
            f"({upstream.balance}, retries {upstream.retries}, connect {upstream.timeouts.connect:g}s, read {upstream.timeouts.read:g}s)\n"
        )
        blocks = effective_blocks(config, route)
        if not blocks:
            out.write("      policies: none\n")
        for name, block in blocks.items():
            origin = "route" if getattr(route, name) is not None else "defaults"
            out.write(f"      {name} ({origin}): {_summary(block)}\n")
        off = [name for name in config.policy_names if getattr(route, name) is False]
        if off:
            out.write(f"      switched off here: {', '.join(off)}\n")


def _summary(block: Any) -> str:
    if isinstance(block, (list, tuple)):
        return "; ".join(_summary(item) for item in block)
    if hasattr(block, "model_dump"):
        data = block.model_dump(mode="json", exclude_defaults=True)
        return json.dumps(data, separators=(", ", ": ")) if data else "(defaults)"
    return repr(block)
