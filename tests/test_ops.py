"""The operator kit in ops/: alerting rules and their unit tests, the Prometheus config, the
Grafana dashboard and its provisioning, the compose stack and its gateway config.

Checked with promtool (Debian's prometheus package; CI installs it), and against what a running
gateway exports: every metric and label the rules and the dashboard query must be in a real
scrape, and every metric family in a scrape must have a panel.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import load_config
from tests.conftest import base_config, free_port

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "ops"
PROMETHEUS_DIR = OPS / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = OPS / "grafana" / "dashboard.json"
GRAFANA_DATASOURCES = OPS / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = OPS / "grafana" / "provisioning" / "dashboards" / "gateway.yml"
COMPOSE = OPS / "docker-compose.yml"
COMPOSE_CONFIG = OPS / "gateway.compose.yaml"

# Series Prometheus makes itself for every scrape target, not exported by the gateway.
SYNTHETIC = {"up": frozenset({"job", "instance"})}
TARGET_LABELS = frozenset({"job", "instance"})  # added by Prometheus to every scraped series
SEVERITIES = {"critical", "warning", "info"}
COMPOSE_SERVICES = {"redis", "upstream", "gateway", "prometheus", "grafana"}


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    path = "/usr/bin/promtool" if os.access("/usr/bin/promtool", os.X_OK) else shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: it comes with Debian's prometheus package, which CI installs (bash .ci/run)")
    return subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# -- PromQL, read just enough to name metrics and labels ---------------------------------------

GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(?![\w:])\s*(\{[^}]*\})?(?!\s*\()")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.*?)\s*,\s*([a-zA-Z_]\w*)\s*\)\s*$", re.S)
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_]\w*)\s*\}\}")


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as Prometheus would receive them: intervals as 5m, selections as .*"""
    expr = re.sub(r"\$\{?__(?:rate_)?(?:interval|range)\}?", "5m", expr)
    return re.sub(r"\$\{?[a-zA-Z_]\w*(?::\w+)?\}?", ".*", expr)


@dataclass
class Query:
    expr: str
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)  # (metric, matcher labels)
    grouping: set[str] = field(default_factory=set)  # labels in by/without/on/ignoring/group_*


def read_promql(expr: str) -> Query:
    query = Query(expr)
    text = STRING.sub('""', grafana_to_promql(expr))
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    for match in GROUPING.finditer(text):
        query.grouping |= {label.strip() for label in match.group(1).split(",") if label.strip()}
    text = GROUPING.sub(" ", text)
    for match in SELECTOR.finditer(text):
        name, braces = match.group(1), match.group(2) or ""
        if name in KEYWORDS:
            continue
        query.selectors.append((name, set(MATCHER.findall(braces))))
    return query


# -- the ops files ---------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule]


@dataclass
class DashboardQuery:
    where: str
    expr: str
    legend: str = ""


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def dashboard_queries(dashboard: dict[str, Any]) -> list[DashboardQuery]:
    queries = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            queries.append(DashboardQuery(f"panel {panel['title']!r} target {target.get('refId')}", target["expr"], target.get("legendFormat", "")))
    for annotation in dashboard["annotations"]["list"]:
        if annotation.get("expr"):
            queries.append(DashboardQuery(f"annotation {annotation['name']!r}", annotation["expr"]))
    return queries


def dashboard_variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, expression, label) of every label_values() variable."""
    found = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = LABEL_VALUES.match(query)
        assert match, f"variable {variable['name']}: expected label_values(<selector>, <label>), got {query!r}"
        found.append((variable["name"], match.group(1), match.group(2)))
    return found


def all_promql() -> list[tuple[str, str]]:
    """(where, expression) of every PromQL expression in alerts.yml and dashboard.json."""
    exprs = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs += [(query.where, query.expr) for query in dashboard_queries(dashboard)]
    exprs += [(f"variable ${name}", expr) for name, expr, _ in dashboard_variable_queries(dashboard)]
    return exprs


# -- promtool --------------------------------------------------------------------------------


def test_alerting_rules_pass_promtool_check_rules() -> None:
    result = promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_unit_tests_pass_promtool_test_rules() -> None:
    result = promtool("test", "rules", ALERTS_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_prometheus_config_passes_promtool_check_config_and_loads_the_rules() -> None:
    result = promtool("check", "config", PROMETHEUS_CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    config = load_yaml(PROMETHEUS_CONFIG)
    assert [PROMETHEUS_DIR / path for path in config["rule_files"]] == [ALERTS]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "gateway"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"] == [{"targets": ["gateway:9090"]}]


def test_every_alert_has_a_severity_a_summary_a_description_and_a_for_duration() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{rule['alert']}: expected a for: duration"


def test_every_alert_has_unit_tests_where_it_fires_and_where_it_does_not() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for group in load_yaml(ALERTS_TEST)["tests"]:
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts without a test case where they fire"
    assert names - silent == set(), "alerts without a test case where they must not fire"
    assert (fires | silent) - names == set(), "test cases for alerts that do not exist"


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    rules = [
        {"record": f"dashboard:query_{index}", "expr": grafana_to_promql(query.expr)}
        for index, query in enumerate(dashboard_queries(dashboard))
    ]
    rules += [
        {"record": f"dashboard:variable_{name}", "expr": grafana_to_promql(expr)}
        for name, expr, _ in dashboard_variable_queries(dashboard)
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- against a running gateway ---------------------------------------------------------------


@dataclass
class Exported:
    names: set[str]  # every series name a scrape can hold (counters with _total, histograms with _bucket/_count/_sum)
    labels: dict[str, set[str]]  # labels seen per series name
    family_of: dict[str, str]  # series name → metric family


async def scrape_a_busy_gateway(upstream: Any, start_gateway: Any, redis_server: Any, client: aiohttp.ClientSession) -> Exported:
    """A gateway with every feature the kit watches: a rate limit that refuses, auth with an HS256
    secret and a JWKS issuer, body checks that refuse, Redis that goes away, a dead upstream, a
    reload."""
    signing_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(signing_key.public_key()))
    jwk.update({"kid": "k1", "alg": "ES256", "use": "sig"})

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/.well-known/jwks.json":
            return web.json_response({"keys": [jwk]})
        return web.json_response({"path": request.path})

    upstream.handler = answer
    secret = "s" * 32
    config = base_config(upstream.url)
    config["upstreams"]["dead"] = {
        "targets": [f"http://127.0.0.1:{free_port()}"],  # nothing listens: 502, then ejected
        "timeouts": {"connect": "1s", "read": "5s"},
        "health": {"passive": {"failures": 1, "eject_for": "1m"}},
    }
    config["routes"] = [
        {"name": "dead", "match": {"path": "/dead"}, "upstream": "dead"},
        {"name": "limited", "match": {"path": "/limited"}, "upstream": "api", "rate_limit": [{"key": "ip", "limit": 1000, "window": "1m"}]},
        {"name": "cached", "match": {"path": "/cached"}, "upstream": "api", "cache": {"ttl": "1m"}},
        {
            "name": "forms", "match": {"path": "/forms"}, "upstream": "api",
            "sanitize": {"mode": "reject"}, "validate": {"content_types": ["application/json"]},
        },
        {
            "name": "all", "match": {"path": "/"}, "upstream": "api",
            "rate_limit": [{"key": "ip", "limit": 3, "window": "1m"}],
            "auth": {"required": True},
        },
    ]  # fmt: skip
    config["auth"] = {
        "jwt": [
            {"issuer": "https://hs.test", "secret": secret, "algorithms": ["HS256"]},
            {"issuer": "https://jwks.test", "algorithms": ["ES256"], "jwks_url": upstream.url + "/.well-known/jwks.json"},
        ]
    }
    config["redis"] = {"url": redis_server.url, "timeout": "500ms"}
    gateway = await start_gateway(config)

    token = jwt.encode({"iss": "https://hs.test", "sub": "ada", "exp": int(time.time()) + 600}, secret, algorithm="HS256")
    statuses = []
    for path, headers in [
        ("/", {"Authorization": f"Bearer {token}"}),
        ("/", {"Authorization": "Bearer junk"}),  # allowed by the limit, refused by auth (401)
        ("/", {"Authorization": f"Bearer {token}"}),
        ("/", {"Authorization": f"Bearer {token}"}),  # over the limit: refused (429)
        ("/dead", {}),  # 502, the target ejected
        ("/limited", {}),
        ("/cached", {}),  # a miss, stored
        ("/cached", {}),  # a hit
    ]:
        async with client.get(gateway.url + path, headers=headers) as response:
            await response.read()
            statuses.append(response.status)
    for body, content_type in [(b'{"name": "<b>ada</b>"}', "application/json"), (b"name=ada", "application/x-www-form-urlencoded")]:
        async with client.post(gateway.url + "/forms", data=body, headers={"Content-Type": content_type}) as response:
            await response.read()
            statuses.append(response.status)
    assert statuses == [200, 401, 200, 429, 502, 200, 200, 200, 422, 415]
    assert await gateway.gateway.reload()
    redis_server.stop()
    for _ in range(4):  # fallback decisions; the breaker opens after three failures
        async with client.get(gateway.url + "/limited") as response:
            assert response.status == 200

    async with client.get(gateway.admin_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    exported = Exported(set(), {}, {})
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            exported.names.add(family.name + suffix)
            exported.family_of[family.name + suffix] = family.name
        for sample in family.samples:
            exported.names.add(sample.name)
            exported.family_of[sample.name] = family.name
            exported.labels.setdefault(sample.name, set()).update(sample.labels)
    return exported


def metric_and_label_problems(where: str, query: Query, exported: Exported, legend: str = "") -> list[str]:
    problems = []
    known: set[str] = set(TARGET_LABELS)
    for name, matchers in query.selectors:
        if name in SYNTHETIC:
            labels = set(SYNTHETIC[name])
        elif name in exported.names:
            if name not in exported.labels:
                problems.append(f"{where}: {name} had no samples in the scrape, so its labels cannot be checked")
                continue
            labels = exported.labels[name] | TARGET_LABELS
        else:
            problems.append(f"{where}: {name} is not exported by the gateway")
            continue
        known |= labels
        problems += [f"{where}: {name} has no label {label!r} (it has {sorted(labels)})" for label in sorted(matchers - labels)]
    problems += [f"{where}: no metric in the expression has a label {label!r}" for label in sorted(query.grouping - known)]
    if legend:
        result_labels = query.grouping or known
        missing = sorted(set(LEGEND_LABEL.findall(legend)) - result_labels)
        problems += [f"{where}: the legend uses {{{{{label}}}}}, which the result has not" for label in missing]
    return problems


async def test_metrics_and_labels_in_alerts_and_dashboard_are_what_the_gateway_exports(upstream, start_gateway, redis_server, client) -> None:
    exported = await scrape_a_busy_gateway(upstream, start_gateway, redis_server, client)
    problems = []
    for rule in alert_rules():
        problems += metric_and_label_problems(f"alert {rule['alert']}", read_promql(rule["expr"]), exported)
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for query in dashboard_queries(dashboard):
        problems += metric_and_label_problems(query.where, read_promql(query.expr), exported, query.legend)
    for name, expr, label in dashboard_variable_queries(dashboard):
        parsed = read_promql(expr)
        problems += metric_and_label_problems(f"variable ${name}", parsed, exported)
        for metric, _ in parsed.selectors:
            if label not in exported.labels.get(metric, SYNTHETIC.get(metric, set())) | TARGET_LABELS:
                problems.append(f"variable ${name}: {metric} has no label {label!r}")
    assert problems == []
    for where, expr in all_promql():  # the reader above found something in every expression
        assert read_promql(expr).selectors, f"{where}: no metric found in {expr!r}"


async def test_every_metric_family_the_gateway_exports_has_a_dashboard_panel(upstream, start_gateway, redis_server, client) -> None:
    exported = await scrape_a_busy_gateway(upstream, start_gateway, redis_server, client)
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    shown = {
        exported.family_of[name]
        for query in dashboard_queries(dashboard)
        for name, _ in read_promql(query.expr).selectors
        if name in exported.family_of
    }
    families = {family for family in exported.family_of.values() if not family.endswith("_created")}
    assert families - shown == set(), "metric families without a panel in ops/grafana/dashboard.json"


# -- Grafana -----------------------------------------------------------------------------------


def test_dashboard_parses_and_every_panel_has_a_title_and_a_query() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] and dashboard["title"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    for variable in variables.values():
        if variable["type"] == "query":  # what the editor shows is what runs
            assert variable["definition"] == variable["query"]["query"], variable["name"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == load_yaml(GRAFANA_DATASOURCES)["datasources"][0]["uid"]
    panels = list(dashboard_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [panel["title"] for panel in panels if panel["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    for panel in panels:
        assert panel.get("title", "").strip(), f"panel {panel['id']} has no title"
        position = panel["gridPos"]
        assert position["x"] >= 0 and position["w"] > 0 and position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel.get("targets", [])
        assert targets and all(target.get("expr", "").strip() for target in targets), f"panel {panel['title']!r} has no query"
        assert len({target["refId"] for target in targets}) == len(targets), panel["title"]
    # The panels the operator kit promises, by the metric each must show.
    required = {
        "request rate by route and status": "http_request_duration_seconds_count",
        "5xx ratio": "http_request_duration_seconds_count",
        "latency percentiles": "http_request_duration_seconds_bucket",
        "in-flight requests": "http_requests_in_flight",
        "upstream latency by target": "upstream_request_duration_seconds_bucket",
        "upstream target up": "upstream_target_up",
        "rate-limit decisions": "rate_limit_decisions_total",
        "auth failures": "auth_failures_total",
        "redis up": "redis_up",
        "redis command latency": "redis_command_duration_seconds_bucket",
        "circuit transitions": "redis_circuit_transitions_total",
        "fallback decisions": "store_fallback_decisions_total",
        "jwks refreshes": "jwks_refreshes_total",
        "config reloads": "config_reloads_total",
        "build info": "gateway_build_info",
    }
    used = {name for query in dashboard_queries(dashboard) for name, _ in read_promql(query.expr).selectors}
    assert {what for what, metric in required.items() if metric not in used} == set()
    latency = [query.expr for query in dashboard_queries(dashboard) if "http_request_duration_seconds_bucket" in query.expr]
    assert {re.search(r"histogram_quantile\((0\.\d+)", expr).group(1) for expr in latency} >= {"0.5", "0.95", "0.99"}  # type: ignore[union-attr]


def test_grafana_provisioning_loads_the_dashboard_from_prometheus() -> None:
    (datasource,) = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(GRAFANA_DASHBOARDS)["providers"]
    assert provider["type"] == "file"
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = dict(bind_mounts(grafana))
    assert mounts[OPS / "grafana" / "provisioning"] == "/etc/grafana/provisioning"
    assert Path(mounts[DASHBOARD]).parent == Path(provider["options"]["path"])


# -- the compose stack ---------------------------------------------------------------------------


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(local path, container path) of the service's bind mounts, resolved from ops/."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((OPS / source).resolve(), target))
    return mounts


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment with compose's ${VAR:-default} taken at its default."""
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)) for key, value in environment.items()}


def test_compose_file_names_five_services_and_every_local_file_it_mounts_exists() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == COMPOSE_SERVICES
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for source, _ in bind_mounts(service):
            assert source.exists(), f"{name} mounts {source}, which does not exist"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            assert source.startswith((".", "/")) or source in named_volumes, f"{name}: volume {source} is not declared"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
        if "build" in service:
            context = (OPS / service["build"]["context"]).resolve()
            assert context == ROOT and (context / service["build"]["dockerfile"]).is_file(), name
    assert services["redis"]["image"].split(":") == ["redis", "7"]
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_compose_upstream_and_gateway_run_the_projects_image() -> None:
    services = load_yaml(COMPOSE)["services"]
    upstream, gateway = services["upstream"], services["gateway"]
    assert upstream["image"] == gateway["image"] and upstream["build"] == gateway["build"]
    assert [*upstream["entrypoint"], *upstream["command"]] == ["python", "-m", "gateway.sample_upstream", "--host", "0.0.0.0", "--port", "8081"]
    assert (ROOT / "gateway" / "sample_upstream.py").is_file()
    assert "CMD" in upstream["healthcheck"]["test"]  # the image's HEALTHCHECK asks an admin listener it has not
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    config_path = re.search(r"GATEWAY_CONFIG=(\S+)", dockerfile).group(1)  # type: ignore[union-attr]
    assert dict(bind_mounts(gateway))[COMPOSE_CONFIG] == compose_environment(gateway).get("GATEWAY_CONFIG", config_path) == config_path
    prometheus = services["prometheus"]
    assert dict(bind_mounts(prometheus))[PROMETHEUS_DIR] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    grafana = compose_environment(services["grafana"])
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_compose_gateway_config_validates_and_points_at_the_compose_services() -> None:
    services = load_yaml(COMPOSE)["services"]
    config = load_config(COMPOSE_CONFIG, compose_environment(services["gateway"]))  # parses only; nothing connects
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 8080)
    assert (config.admin.host, config.admin.port) == ("0.0.0.0", 9090)
    assert config.redis is not None and config.redis.url == "redis://redis:6379/0"
    assert list(config.upstreams["marketplace"].targets) == ["http://upstream:8081"]
    raw = load_yaml(COMPOSE_CONFIG)
    assert raw["auth"]["jwt"]["jwks_url"] == "http://upstream:8081/.well-known/jwks.json"
    # Every address names a compose service, on the port that service listens on.
    command = services["upstream"]["command"]
    assert command[command.index("--port") + 1] == "8081" and command[command.index("--host") + 1] == "0.0.0.0"
    (gateway_job,) = [job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"] if job["job_name"] == "gateway"]
    assert gateway_job["static_configs"][0]["targets"] == [f"gateway:{config.admin.port}"]
    assert f"127.0.0.1:8080:{config.listen.port}" in services["gateway"]["ports"]
    assert f"127.0.0.1:9091:{config.admin.port}" in services["gateway"]["ports"]


def test_compose_gateway_config_keeps_every_other_block_of_gateway_yaml() -> None:
    repository = load_yaml(ROOT / "gateway.yaml")
    compose = load_yaml(COMPOSE_CONFIG)
    expected = copy.deepcopy(repository)
    expected["listen"].update(host="0.0.0.0", port=8080)
    expected["admin"].update(host="0.0.0.0", port=9090)
    expected["redis"] = compose["redis"]
    expected["upstreams"]["marketplace"]["targets"] = ["http://upstream:8081"]
    expected["auth"]["jwt"]["jwks_url"] = "http://upstream:8081/.well-known/jwks.json"
    assert compose == expected, "ops/gateway.compose.yaml drifted from gateway.yaml: change both"
    assert compose["redis"]["url"] == "redis://redis:6379/0"


# -- a real Prometheus -----------------------------------------------------------------------------

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": "gateway", "$instance": ".*", "$route": ".*"}


async def prometheus_api(session: aiohttp.ClientSession, base: str, path: str, **params: str) -> Any:
    async with session.get(base + path, params=params) as response:
        document = await response.json()
    assert document["status"] == "success", document
    return document["data"]


async def until(check: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, f"Prometheus: {what} not reached in {timeout:.0f} s"
        await asyncio.sleep(0.5)


async def test_a_real_prometheus_scrapes_the_gateway_and_evaluates_every_rule_and_panel(upstream, start_gateway, redis_server, client, tmp_path) -> None:
    """ops/prometheus/prometheus.yml and alerts.yml, run by Debian's prometheus against a live
    gateway: the target is up, every alert rule evaluates without error, and every dashboard
    query runs (with Grafana's variables filled in) and the traffic panels have data."""
    binary = shutil.which("prometheus") or pytest.fail("prometheus is missing: Debian's prometheus package, which CI installs")
    config = base_config(upstream.url)
    config["routes"][0]["cache"] = {"ttl": "1m"}
    config["routes"][0]["rate_limit"] = [{"key": "ip", "limit": 5, "window": "1m"}]
    config["redis"] = {"url": redis_server.url, "timeout": "500ms"}
    gateway = await start_gateway(config)
    for _ in range(8):  # misses, hits and 429s
        async with client.get(gateway.url + "/p") as response:
            await response.read()

    settings = load_yaml(PROMETHEUS_CONFIG)
    settings["global"].update(scrape_interval="1s", evaluation_interval="1s")
    settings["rule_files"] = [str(ALERTS)]
    port = free_port()
    for job in settings["scrape_configs"]:
        job.update(scrape_interval="1s", scrape_timeout="1s")
        job["static_configs"] = [{"targets": [gateway.admin_url.removeprefix("http://") if job["job_name"] == "gateway" else f"127.0.0.1:{port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(settings))
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                try:
                    async with session.get(base + "/-/ready") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            async def gateway_up() -> bool:
                targets = (await prometheus_api(session, base, "/api/v1/targets"))["activeTargets"]
                return any(t["labels"]["job"] == "gateway" and t["health"] == "up" for t in targets)

            async def rules_evaluated() -> list[dict[str, Any]]:
                groups = (await prometheus_api(session, base, "/api/v1/rules"))["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                return rules if rules and all(not rule["lastEvaluation"].startswith("0001") for rule in rules) else []

            await until(ready, "ready")
            await until(gateway_up, "the gateway target up")
            rules = await until(rules_evaluated, "every rule evaluated")
            assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
            assert [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"] == []

            dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))

            async def results() -> dict[str, list[Any]]:
                found = {}
                for query in dashboard_queries(dashboard):  # every query runs (the API says success)
                    expr = query.expr
                    for variable, value in GRAFANA_VARIABLES.items():
                        expr = expr.replace(variable, value)
                    found[query.where] = (await prometheus_api(session, base, "/api/v1/query", query=expr))["result"]
                return found

            async def traffic_shown() -> dict[str, list[Any]]:
                found = await results()  # rates need two scrapes after the traffic
                return found if all(found[where] for where in found if where.startswith(WITH_DATA)) else {}

            await until(traffic_shown, "data in the traffic and cache panels")
    finally:
        process.terminate()
        process.wait(10)


WITH_DATA = ("panel 'Request rate by route and status'", "panel 'Cache hit ratio'", "panel 'Rate-limit decisions")
