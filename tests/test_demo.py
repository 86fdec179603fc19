"""The README's first command: the sample API with the gateway in front, on the embedded store."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.conftest import ROOT, free_port


def fetch(url: str, headers: dict[str, str] | None = None, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={**(headers or {}), **({"Content-Type": "application/json"} if data else {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_the_demo_serves_the_sample_api_through_the_gateway_and_stops_cleanly():
    ports = {"GATEWAY_PORT": free_port(), "GATEWAY_ADMIN_PORT": free_port(), "SAMPLE_UPSTREAM_PORT": free_port()}
    env = {**os.environ, **{name: str(port) for name, port in ports.items()}}
    env.pop("REDIS_URL", None)
    demo = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo", "-c", str(ROOT / "gateway.yaml")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{ports['GATEWAY_PORT']}"
    try:
        output = b""
        deadline = time.monotonic() + 20
        while b"Ctrl-C stops both" not in output:
            assert time.monotonic() < deadline, f"the demo did not come up: {output.decode()}"
            if select.select([demo.stdout], [], [], 0.2)[0]:
                output += os.read(demo.stdout.fileno(), 65536)
        assert f"curl -i {base}/api/products".encode() in output
        status, product = fetch(base + "/api/products/1")
        assert status == 200 and product["name"] == "Walnut serving board"
        status, problem = fetch(base + "/nowhere")
        assert status == 404 and problem["type"].endswith("/no-route")
        status, ready = fetch(f"http://127.0.0.1:{ports['GATEWAY_ADMIN_PORT']}/readyz")
        assert status == 200 and ready["status"] in ("ready", "degraded")
        assert ready["checks"]["jwks"][f"http://127.0.0.1:{ports['SAMPLE_UPSTREAM_PORT']}/.well-known/jwks.json"]["status"] == "fresh"
        # The sample issuer's token opens the users route; without one it is a 401.
        status, problem = fetch(base + "/api/users/1")
        assert status == 401 and problem["status"] == 401
        status, issued = fetch(base + "/auth/token", body={"user": "ada"})
        assert status == 200
        bearer = {"Authorization": f"Bearer {issued['access_token']}", "X-User-Id": "2"}
        status, user = fetch(base + "/api/users/1", bearer)
        assert status == 200 and user["name"] == "Ada"
        status, echoed = fetch(base + "/api/echo", bearer)
        assert echoed["headers"]["X-User-Id"] == "1"  # from the token, not the client's header
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 0
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
        demo.stdout.close()
    # both processes are gone: nothing listens on their ports any more
    for port in ports.values():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
