"""The command line, run as a real process: `python -m gateway check | schema | --version`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway import __version__
from gateway.config import json_schema

GOOD = """\
listen: {host: 127.0.0.1, port: 8080}
admin: {host: 127.0.0.1, port: 9090}
upstreams:
  api:
    targets: [http://127.0.0.1:8081, http://127.0.0.1:8082]
    timeouts: {connect: 2s, read: 30s}
  legacy:
    targets: [http://10.0.0.7:9000]
routes:
  - name: products
    match: {path: /api/products, methods: [GET, HEAD]}
    upstream: api
  - name: old-api
    match: {path_regex: "^/v1/"}
    upstream: legacy
"""


def gateway(*args: str, cwd: Path, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m gateway ...` in cwd, with GATEWAY_CONFIG only when the test sets it.

    In ``env``, a value of None removes the variable from the process environment.
    """
    environ = {key: value for key, value in os.environ.items() if key != "GATEWAY_CONFIG"}
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_check_on_a_good_file_exits_0_and_prints_each_route_with_its_upstream_and_targets(tmp_path: Path) -> None:
    config = write(tmp_path / "good.yaml", GOOD)
    result = gateway("check", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{config}: OK")
    assert "2 route(s), 2 upstream(s)" in lines[0]

    def line_of(*parts: str) -> int:
        found = [index for index, line in enumerate(lines) if all(part in line for part in parts)]
        assert len(found) == 1, (parts, result.stdout)
        return found[0]

    products = line_of("products", "/api/products", "GET,HEAD")
    products_upstream = line_of("upstream api", "http://127.0.0.1:8081, http://127.0.0.1:8082")
    old = line_of("old-api", "^/v1/")
    old_upstream = line_of("upstream legacy", "http://10.0.0.7:9000")
    # Routes in config order (first match wins), each followed by its upstream.
    assert products < products_upstream < old < old_upstream


def test_check_on_a_broken_file_exits_2_and_names_the_file_and_every_key_path(tmp_path: Path) -> None:
    config = write(
        tmp_path / "broken.yaml",
        """\
        workers: lots
        upstreams:
          api:
            targets: [http://127.0.0.1:8081/api]
            timeouts: {connect: 15 minutes}
        routes:
          - name: products
            match: {path: /api/products, methods: [GET, FETCH]}
            upstream: api
            cahce: {ttl: 5m}
        """,
    )
    result = gateway("check", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert str(config) in result.stderr
    for path in ("workers", "upstreams.api.targets[0]", "upstreams.api.timeouts.connect", "routes[0].match.methods[1]", "routes[0].cahce"):
        assert f"{path}: " in result.stderr, (path, result.stderr)
    assert "expected a duration such as" in result.stderr
    assert "got '15 minutes'" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_an_unknown_upstream_at_its_key_path(tmp_path: Path) -> None:
    config = write(
        tmp_path / "gateway.yaml",
        """\
        upstreams:
          api: {targets: [http://127.0.0.1:8081]}
        routes:
          - {name: products, match: {path: /api/products}, upstream: apj}
          - {name: users, match: {path: /api/users}, upstream: user-service}
        """,
    )
    result = gateway("check", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"{config}: 2 errors" in result.stderr
    assert "routes[0].upstream: unknown upstream 'apj'; did you mean 'api'?" in result.stderr
    assert "routes[1].upstream: unknown upstream 'user-service'" in result.stderr


def test_check_on_invalid_yaml_exits_2_with_the_line(tmp_path: Path) -> None:
    config = write(tmp_path / "gateway.yaml", "upstreams:\n  api: {targets: [http://127.0.0.1:8081]\nroutes: []\n")
    result = gateway("check", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{config}: line 3, column 1: invalid YAML" in result.stderr


def test_check_on_a_missing_file_exits_2_and_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    result = gateway("check", "-c", str(missing), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"{missing}: cannot read the file" in result.stderr


def test_the_gateway_config_variable_names_the_file_when_c_is_absent(tmp_path: Path) -> None:
    config = write(tmp_path / "from-env.yaml", GOOD)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = gateway("check", cwd=elsewhere, env={"GATEWAY_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: OK")


def test_c_wins_over_the_gateway_config_variable(tmp_path: Path) -> None:
    good = write(tmp_path / "good.yaml", GOOD)
    broken = write(tmp_path / "broken.yaml", "workers: lots\n")
    result = gateway("check", "-c", str(good), cwd=tmp_path, env={"GATEWAY_CONFIG": str(broken)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{good}: OK")


def test_check_reads_gateway_yaml_in_the_current_folder_by_default(tmp_path: Path) -> None:
    write(tmp_path / "gateway.yaml", GOOD)
    result = gateway("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gateway.yaml: OK")


def test_check_without_any_config_exits_2_naming_the_default_file(tmp_path: Path) -> None:
    result = gateway("check", cwd=tmp_path)
    assert result.returncode == 2
    assert "gateway.yaml: cannot read the file" in result.stderr


def test_check_interpolates_from_the_process_environment(tmp_path: Path) -> None:
    config = write(tmp_path / "gateway.yaml", GOOD.replace("port: 8080", 'port: "${PUBLIC_PORT}"'))
    result = gateway("check", "-c", str(config), cwd=tmp_path, env={"PUBLIC_PORT": "8443"})
    assert result.returncode == 0, result.stderr
    assert "listen 127.0.0.1:8443 " in result.stdout


def test_check_on_a_missing_variable_exits_2_naming_it_and_its_key_path(tmp_path: Path) -> None:
    config = write(tmp_path / "gateway.yaml", GOOD.replace("port: 8080", 'port: "${PUBLIC_PORT}"'))
    result = gateway("check", "-c", str(config), cwd=tmp_path, env={"PUBLIC_PORT": None})
    assert result.returncode == 2
    assert f"{config}: listen.port: environment variable PUBLIC_PORT is not set" in result.stderr


def test_schema_prints_the_json_schema(tmp_path: Path) -> None:
    result = gateway("schema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(json.dumps(json_schema()))


def test_version_prints_the_version(tmp_path: Path) -> None:
    result = gateway("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == f"gateway {__version__}\n"


@pytest.mark.parametrize("args", [(), ("frobnicate",)], ids=["no command", "an unknown command"])
def test_a_missing_or_unknown_command_is_a_usage_error(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = gateway(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: gateway")
