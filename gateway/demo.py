"""Try the gateway in one command: the sample marketplace API with the gateway in front of it.

    python -m gateway.demo [-c gateway.yaml]

Starts ``gateway.sample_upstream`` on $SAMPLE_UPSTREAM_PORT (8081) and ``gateway run`` with the
config (the repository's gateway.yaml points at that port), prints a few curl commands, and
stops both on Ctrl-C or SIGTERM. Uses the embedded in-memory store: no Redis needed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from gateway.cli import default_path
from gateway.config import load_config
from gateway.errors import ConfigError


def wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.demo", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=None, help="config file (default: $GATEWAY_CONFIG or ./gateway.yaml)")
    args = parser.parse_args(argv)
    path = args.config or default_path()
    env = dict(os.environ)
    upstream_port = int(env.setdefault("SAMPLE_UPSTREAM_PORT", "8081"))
    try:
        config = load_config(path, env)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    upstream = subprocess.Popen([sys.executable, "-m", "gateway.sample_upstream", "--port", str(upstream_port)], env=env)
    if not wait_for_port("127.0.0.1", upstream_port, upstream):
        upstream.kill()
        print(f"error: the sample upstream did not start on port {upstream_port} (is the port taken?)", file=sys.stderr)
        return 1
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", path], env=env)
    host = "127.0.0.1" if config.listen.host in ("0.0.0.0", "::") else config.listen.host
    base = f"http://{host}:{config.listen.port}"
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        gateway.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if wait_for_port(host, config.listen.port, gateway):
            print(
                f"\nThe gateway is up at {base}, in front of the sample API on port {upstream_port}. Try:\n"
                f"  curl -i {base}/api/products\n"
                f"  curl -i {base}/api/products/1\n"
                f"  curl -i -X POST {base}/api/products -H 'Content-Type: application/json' -d '{{\"name\": \"Oak bowl\", \"price\": 30}}'\n"
                f"  curl -i {base}/api/../api/artisans          # normalised to /api/artisans\n"
                f"  curl -i -X DELETE {base}/api/artisans/1     # 405 with Allow\n"
                f"  curl -i {base}/nowhere                      # a 404 problem+json with its request id\n"
                f"  curl -i {base}/api/users/1                  # 401: this route needs a token\n"
                f"  TOKEN=$(curl -s -X POST {base}/auth/token -d '{{\"user\": \"ada\"}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')\n"
                f"  curl -i {base}/api/users/1 -H \"Authorization: Bearer $TOKEN\"\n"
                f"  curl -i -X OPTIONS {base}/api/products -H 'Origin: https://shop.example' -H 'Access-Control-Request-Method: POST'   # CORS preflight, answered by the gateway\n"
                + (f"  curl -s http://{config.admin.host}:{config.admin.port}/readyz\n" if config.admin else "")
                + (f"  curl -s -X POST http://{config.admin.host}:{config.admin.port}/cache/purge -d '{{\"prefix\": \"/api/products\"}}'   # the next GET is a miss\n" if config.admin and not config.admin.token else "")
                + "Ctrl-C stops both.\n",
                flush=True,
            )
        code = gateway.wait()
    finally:
        if gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(30)
        upstream.terminate()
        upstream.wait(10)
    return 0 if stopping else code


if __name__ == "__main__":
    sys.exit(main())
