"""Loading gateway.yaml: units, ${VAR} interpolation, errors with key paths, defaults, the schema.

The contract is /work/shared/CONFIG.md. Configs are written as YAML text, the way users write
them, and loaded from a real file with :func:`gateway.config.load_config`.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from gateway.config import SCHEMA_PATH, effective_blocks, json_schema, json_schema_text, load_config, parse_config
from gateway.policies import POLICIES
from gateway.errors import ConfigError, ConfigIssue
from gateway.pipeline import Policy
from gateway.settings import Settings

# A route and an upstream: the smallest config that loads. Tests append or prepend blocks.
MINIMAL = """\
upstreams:
  api:
    targets: [http://127.0.0.1:8081]
routes:
  - name: all
    match: {path: /}
    upstream: api
"""

DURATION_EXPECTED = "expected a duration such as '250ms', '30s', '15m', '1h', '1d' or a number of seconds"
SIZE_EXPECTED = "expected a size such as '512b', '64kb' or '1mb'"


class StampSettings(Settings):
    value: str = "x"


class StampPolicy(Policy):
    """A policy made for these tests: its block is `stamp: {value: ...}`."""

    name = "stamp"
    settings_type = StampSettings


STAMP = (StampPolicy,)


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None, policies: tuple[type, ...] | None = None) -> Any:
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, environ={} if environ is None else environ, policies=policies)


def load_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None, policies: tuple[type, ...] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, environ, policies)
    return caught.value


def issues(error: ConfigError) -> dict[str, str]:
    """path → message; fails when two issues share a path, so no issue can hide another."""
    paths = [issue.path for issue in error.issues]
    assert len(paths) == len(set(paths)), error.issues
    return {issue.path: issue.message for issue in error.issues}


def with_timeouts(connect: str) -> str:
    return f"""\
upstreams:
  api:
    targets: [http://127.0.0.1:8081]
    timeouts: {{connect: {connect}}}
routes:
  - name: all
    match: {{path: /}}
    upstream: api
"""


def with_limits(max_header_size: str) -> str:
    return f"listen:\n  limits: {{max_header_size: {max_header_size}}}\n" + MINIMAL


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("250ms", 0.25), ("30s", 30.0), ("15m", 900.0), ("1h", 3600.0), ("1d", 86400.0), ("5", 5.0), ("2.5", 2.5), ("1.5s", 1.5)],
)
def test_a_duration_parses_to_seconds(tmp_path: Path, written: str, seconds: float) -> None:
    config = load(tmp_path, with_timeouts(written))
    assert config.upstreams["api"].timeouts.connect == seconds
    assert isinstance(config.upstreams["api"].timeouts.connect, float)


@pytest.mark.parametrize(
    ("written", "got"),
    [("15 minutes", "'15 minutes'"), ("'-1'", "'-1'"), ("-1", "-1"), ("abc", "'abc'"), ("true", "True"), ("30sec", "'30sec'")],
)
def test_a_bad_duration_is_an_error_naming_the_key_path_and_what_was_expected(tmp_path: Path, written: str, got: str) -> None:
    error = load_error(tmp_path, with_timeouts(written))
    assert issues(error) == {"upstreams.api.timeouts.connect": f"{DURATION_EXPECTED}, got {got}"}
    assert f"upstreams.api.timeouts.connect: {DURATION_EXPECTED}, got {got}" in str(error)


@pytest.mark.parametrize(("written", "size"), [("512b", 512), ("64kb", 65536), ("1mb", 1048576), ("2048", 2048)])
def test_a_size_parses_to_bytes(tmp_path: Path, written: str, size: int) -> None:
    config = load(tmp_path, with_limits(written))
    assert config.listen.limits.max_header_size == size
    assert isinstance(config.listen.limits.max_header_size, int)


@pytest.mark.parametrize(("written", "got"), [("64 kilobytes", "'64 kilobytes'"), ("-1", "-1"), ("abc", "'abc'"), ("true", "True")])
def test_a_bad_size_is_an_error_naming_the_key_path_and_what_was_expected(tmp_path: Path, written: str, got: str) -> None:
    error = load_error(tmp_path, with_limits(written))
    assert issues(error) == {"listen.limits.max_header_size": f"{SIZE_EXPECTED}, got {got}"}


def test_a_zero_timeout_is_refused_where_a_positive_duration_is_needed(tmp_path: Path) -> None:
    error = load_error(tmp_path, with_timeouts("0s"))
    assert list(issues(error)) == ["upstreams.api.timeouts.connect"]
    assert "greater than 0" in error.issues[0].message


# ---------------------------------------------------------------------------------------------
# ${VAR} interpolation
# ---------------------------------------------------------------------------------------------


def test_a_variable_is_replaced_from_the_given_environment_in_a_string_value(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        'admin:\n  host: "${ADMIN_HOST}"\n  token: "tok-${A}-${B}"\n' + MINIMAL,
        environ={"ADMIN_HOST": "10.1.2.3", "A": "one", "B": "two"},
    )
    assert config.admin.host == "10.1.2.3"
    assert config.admin.token == "tok-one-two"


def test_the_environ_argument_is_used_instead_of_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_TOKEN", "from-the-process")
    text = 'admin: {token: "${GW_TEST_TOKEN}"}\n' + MINIMAL
    assert load(tmp_path, text, environ={"GW_TEST_TOKEN": "from-the-argument"}).admin.token == "from-the-argument"
    error = load_error(tmp_path, text, environ={})
    assert list(issues(error)) == ["admin.token"]


@pytest.mark.parametrize(
    ("environ", "token"),
    [({}, "fallback"), ({"TOKEN": "set"}, "set"), ({"TOKEN": ""}, "fallback")],
    ids=["unset uses the default", "set wins over the default", "empty uses the default as in the shell"],
)
def test_a_default_stands_in_for_a_missing_variable(tmp_path: Path, environ: dict[str, str], token: str) -> None:
    config = load(tmp_path, 'admin: {token: "${TOKEN:-fallback}"}\n' + MINIMAL, environ=environ)
    assert config.admin.token == token


def test_an_empty_default_gives_an_empty_string(tmp_path: Path) -> None:
    config = load(tmp_path, 'admin: {token: "${GATEWAY_ADMIN_TOKEN:-}"}\n' + MINIMAL, environ={})
    assert config.admin.token == ""


def test_a_double_dollar_is_a_literal_dollar_and_is_not_interpolated(tmp_path: Path) -> None:
    config = load(tmp_path, 'admin: {token: "pa$$word $${TOKEN} ${TOKEN}"}\n' + MINIMAL, environ={"TOKEN": "t"})
    assert config.admin.token == "pa$word ${TOKEN} t"


def test_a_lone_dollar_is_kept_as_written(tmp_path: Path) -> None:
    config = load(tmp_path, 'admin: {token: "pa$word$"}\n' + MINIMAL)
    assert config.admin.token == "pa$word$"


def test_a_value_from_the_environment_is_not_interpolated_again(tmp_path: Path) -> None:
    config = load(tmp_path, 'admin: {token: "${TOKEN}"}\n' + MINIMAL, environ={"TOKEN": "${OTHER} $$"})
    assert config.admin.token == "${OTHER} $$"


def test_a_missing_variable_without_a_default_is_an_error_naming_the_key_path(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        """\
        admin: {token: "${ADMIN_TOKEN}"}
        upstreams:
          api:
            targets: [http://127.0.0.1:8081, "http://${SECOND_HOST}:8081"]
        routes:
          - name: all
            match: {path: /}
            upstream: api
        """,
    )
    found = issues(error)
    assert set(found) == {"admin.token", "upstreams.api.targets[1]"}
    assert "ADMIN_TOKEN is not set" in found["admin.token"]
    assert "SECOND_HOST is not set" in found["upstreams.api.targets[1]"]


def test_interpolation_yields_typed_values_after_validation(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        listen: {port: "${PORT}", limits: {max_header_size: "${HEADERS:-32kb}"}}
        workers: "${WORKERS}"
        upstreams:
          api:
            targets: ["${TARGET}"]
            timeouts: {connect: "${CONNECT:-250ms}"}
            retries: "${RETRIES:-3}"
        routes:
          - name: all
            match: {path: /}
            upstream: api
        """,
        environ={"PORT": "8443", "WORKERS": "4", "TARGET": "http://10.0.0.5:8080"},
    )
    assert config.listen.port == 8443 and type(config.listen.port) is int
    assert config.listen.limits.max_header_size == 32768
    assert config.workers == 4 and type(config.workers) is int
    assert config.upstreams["api"].targets == ("http://10.0.0.5:8080",)
    assert config.upstreams["api"].timeouts.connect == 0.25
    assert config.upstreams["api"].retries == 3 and type(config.upstreams["api"].retries) is int


def test_an_interpolated_value_of_the_wrong_type_is_an_error_at_its_key_path(tmp_path: Path) -> None:
    error = load_error(tmp_path, 'listen: {port: "${PORT}"}\n' + MINIMAL, environ={"PORT": "eighty"})
    assert issues(error) == {"listen.port": "expected an integer, got 'eighty'"}


def test_interpolation_never_applies_to_the_raw_yaml_text(tmp_path: Path) -> None:
    # A reference in a comment is not looked up, and a value with YAML syntax in it stays one
    # string: replacing in the raw text would have made it new keys, or broken the document.
    token = 'a: b\n- c # d "e" ${X}'
    config = load(tmp_path, '# the admin token comes from ${UNSET_IN_A_COMMENT}\nadmin: {token: "${TOKEN}"}\n' + MINIMAL, environ={"TOKEN": token})
    assert config.admin.token == token


@pytest.mark.parametrize("written", ["${TOKEN-fallback}", "${TOKEN:fallback}", "${TOKEN", "${ TOKEN }"])
def test_a_malformed_variable_reference_is_an_error_rather_than_literal_text(tmp_path: Path, written: str) -> None:
    error = load_error(tmp_path, f'admin: {{token: "{written}"}}\n' + MINIMAL, environ={"TOKEN": "set"})
    assert list(issues(error)) == ["admin.token"]


# ---------------------------------------------------------------------------------------------
# Unknown keys
# ---------------------------------------------------------------------------------------------

UNKNOWN_KEYS = {
    "at the top level": ("listne: {port: 8080}\n" + MINIMAL, "listne", "listen"),
    "in listen.limits": ("listen:\n  limits: {max_header_sise: 16kb}\n" + MINIMAL, "listen.limits.max_header_sise", "max_header_size"),
    "in a second route's match": (
        """\
upstreams:
  api: {targets: [http://127.0.0.1:8081]}
routes:
  - {name: first, match: {path: /a}, upstream: api}
  - {name: second, match: {path: /b, methds: [GET]}, upstream: api}
""",
        "routes[1].match.methds",
        "methods",
    ),
    "in an upstream's passive health": (
        """\
upstreams:
  api:
    targets: [http://127.0.0.1:8081]
    health: {passive: {failure: 3}}
routes:
  - {name: all, match: {path: /}, upstream: api}
""",
        "upstreams.api.health.passive.failure",
        "failures",
    ),
    "in the admin block": ("admin: {prot: 9091}\n" + MINIMAL, "admin.prot", "port"),
}


@pytest.mark.parametrize(("text", "path", "suggestion"), list(UNKNOWN_KEYS.values()), ids=list(UNKNOWN_KEYS))
def test_an_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path, text: str, path: str, suggestion: str) -> None:
    error = load_error(tmp_path, text)
    found = issues(error)
    assert list(found) == [path]
    key = path.rsplit(".", 1)[-1]
    assert found[path].startswith(f"unknown key {key!r}; did you mean {suggestion!r}? (known keys: ")


def test_an_unknown_key_with_nothing_close_lists_the_known_keys(tmp_path: Path) -> None:
    error = load_error(tmp_path, "frobnicate: 1\n" + MINIMAL)
    message = issues(error)["frobnicate"]
    assert message.startswith("unknown key 'frobnicate' (known keys: listen, workers, admin, upstreams, redis, logging, error_tracking, defaults, routes")
    assert "did you mean" not in message
    for policy in POLICIES:  # the top-level blocks that policies own are known keys too
        if policy.global_settings_type is not None:
            assert policy.name in message


# ---------------------------------------------------------------------------------------------
# Errors: all at once, with file and path
# ---------------------------------------------------------------------------------------------


def test_every_problem_is_listed_at_once_each_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    error = load_error(
        tmp_path,
        """\
        listen: {port: 70000}
        upstreams:
          api:
            targets: [http://127.0.0.1:8081]
            retries: twice
            balance: fastest
        routes:
          - {name: first, match: {path: /a}, upstream: api}
          - {name: second, match: {path: /b, methods: [FETCH, GET]}, upstream: api}
        """,
    )
    assert error.file == str(path)
    assert all(isinstance(issue, ConfigIssue) for issue in error.issues)
    found = issues(error)
    assert set(found) == {"listen.port", "upstreams.api.retries", "upstreams.api.balance", "routes[1].match.methods[0]"}
    assert found["upstreams.api.retries"] == "expected an integer, got 'twice'"
    assert found["upstreams.api.balance"] == "expected one of 'round_robin', 'least_conn' or 'random', got 'fastest'"
    assert found["routes[1].match.methods[0]"].startswith("expected one of 'GET', 'HEAD'")
    assert found["routes[1].match.methods[0]"].endswith("got 'FETCH'")
    assert "65535" in found["listen.port"] and "70000" in found["listen.port"]
    text = str(error)
    assert text.startswith(f"{path}: 4 errors\n")
    assert f"  routes[1].match.methods[0]: {found['routes[1].match.methods[0]']}" in text.splitlines()


def test_a_single_problem_reads_as_one_line_with_file_and_path(tmp_path: Path) -> None:
    error = load_error(tmp_path, "workers: lots\n" + MINIMAL)
    assert str(error) == f"{tmp_path / 'gateway.yaml'}: workers: expected a number of processes (1 or more) or 'auto', got 'lots'"


def test_a_missing_required_key_is_an_error_at_its_path(tmp_path: Path) -> None:
    error = load_error(tmp_path, "upstreams:\n  api: {balance: random}\nroutes:\n  - {name: all, match: {path: /}}\n")
    assert issues(error) == {
        "upstreams.api.targets": "required key is missing",
        "routes[0].upstream": "required key is missing",
    }


def test_a_key_given_twice_is_an_error_with_its_line(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        """\
        upstreams:
          api: {targets: [http://127.0.0.1:8081]}
          api: {targets: [http://127.0.0.1:8082]}
        routes:
          - {name: all, match: {path: /}, upstream: api}
        """,
    )
    assert issues(error) == {"": "line 3, column 3: invalid YAML: key 'api' is given twice"}


def test_invalid_yaml_reports_line_and_column(tmp_path: Path) -> None:
    error = load_error(tmp_path, "upstreams:\n  api:\n\ttargets: [http://127.0.0.1:8081]\n")
    [issue] = error.issues
    assert issue.path == ""
    assert issue.message.startswith("line 3, column 1: invalid YAML: ")
    assert error.file == str(tmp_path / "gateway.yaml")


@pytest.mark.parametrize("text", ["- listen\n- routes\n", "just some words\n", ""], ids=["a list", "a scalar", "an empty file"])
def test_a_document_that_is_not_a_mapping_is_an_error(tmp_path: Path, text: str) -> None:
    error = load_error(tmp_path, text)
    assert issues(error) == {"": "expected a mapping of blocks (listen, upstreams, routes, ...) at the top"}


def test_a_missing_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert caught.value.file == str(path)
    [issue] = caught.value.issues
    assert issue.path == "" and issue.message.startswith("cannot read the file: ")
    assert str(caught.value).startswith(f"{path}: cannot read the file: ")


def test_parse_config_names_the_file_it_is_given(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"routes": []}, "shop.yaml", environ={})
    assert caught.value.file == "shop.yaml"
    assert set(issues(caught.value)) == {"upstreams", "routes"}


def test_a_key_named_like_a_type_keeps_its_place_in_the_error_path(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        """\
        upstreams:
          int: {targets: [http://10.0.0.1:8080/api]}
          none: {targets: [http://10.0.0.1:8080/api]}
        routes:
          - {name: all, match: {path: /}, upstream: int}
        """,
    )
    assert set(issues(error)) == {"upstreams.int.targets[0]", "upstreams.none.targets[0]"}


def test_a_missing_variable_is_reported_together_with_the_other_problems(tmp_path: Path) -> None:
    error = load_error(tmp_path, 'admin: {token: "${ADMIN_TOKEN}", prot: 9091}\n' + MINIMAL)
    assert set(issues(error)) == {"admin.token", "admin.prot"}


def test_an_unknown_upstream_is_reported_together_with_the_other_problems(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        """\
        workers: lots
        upstreams:
          api: {targets: [http://127.0.0.1:8081]}
        routes:
          - {name: all, match: {path: /}, upstream: apj}
        """,
    )
    assert set(issues(error)) == {"workers", "routes[0].upstream"}


# ---------------------------------------------------------------------------------------------
# Cross references between blocks
# ---------------------------------------------------------------------------------------------


def test_an_unknown_upstream_in_a_route_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        """\
        upstreams:
          products: {targets: [http://127.0.0.1:8081]}
        routes:
          - {name: all, match: {path: /}, upstream: prodcts}
        """,
    )
    assert issues(error) == {"routes[0].upstream": "unknown upstream 'prodcts'; did you mean 'products'?"}


def test_an_unknown_upstream_with_nothing_close_has_no_suggestion(tmp_path: Path) -> None:
    error = load_error(tmp_path, "upstreams:\n  api: {targets: [http://127.0.0.1:8081]}\nroutes:\n  - {name: all, match: {path: /}, upstream: billing}\n")
    assert issues(error) == {"routes[0].upstream": "unknown upstream 'billing'"}


def test_cross_reference_problems_are_listed_together(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        """\
        upstreams:
          api: {targets: [http://127.0.0.1:8081]}
        routes:
          - {name: users, match: {path: /users}, upstream: api}
          - {name: users, match: {path: /accounts}, upstream: api}
          - {name: orders, match: {methods: [GET]}, upstream: apo}
        """,
    )
    assert issues(error) == {
        "routes[1].name": "route name 'users' is already used by routes[0]",
        "routes[2].upstream": "unknown upstream 'apo'; did you mean 'api'?",
        "routes[2].match": "give path (a prefix such as /api) or path_regex",
    }


def test_a_route_with_both_path_and_path_regex_is_an_error(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        """\
        upstreams:
          api: {targets: [http://127.0.0.1:8081]}
        routes:
          - {name: all, match: {path: /api, path_regex: "^/api/v[0-9]+/"}, upstream: api}
        """,
    )
    assert issues(error) == {"routes[0].match": "give either path or path_regex, not both"}


def test_a_route_with_path_regex_alone_is_accepted_and_compiled(tmp_path: Path) -> None:
    config = load(tmp_path, 'upstreams:\n  api: {targets: [http://127.0.0.1:8081]}\nroutes:\n  - {name: v, match: {path_regex: "^/api/v[0-9]+/"}, upstream: api}\n')
    match = config.routes[0].match
    assert match.path is None
    assert match.path_regex.search("/api/v2/x") is not None and match.path_regex.search("/api/vx/") is None


# ---------------------------------------------------------------------------------------------
# Switches, workers, targets, paths
# ---------------------------------------------------------------------------------------------


def test_false_switches_off_the_admin_listener(tmp_path: Path) -> None:
    assert load(tmp_path, "admin: false\n" + MINIMAL).admin is None
    admin = load(tmp_path, MINIMAL).admin
    assert (admin.host, admin.port, admin.token) == ("127.0.0.1", 9090, "")


def test_false_switches_off_passive_health_checks(tmp_path: Path) -> None:
    text = "upstreams:\n  api:\n    targets: [http://127.0.0.1:8081]\n    health: {{passive: {passive}}}\nroutes:\n  - {{name: all, match: {{path: /}}, upstream: api}}\n"
    assert load(tmp_path, text.format(passive="false")).upstreams["api"].health.passive is None
    passive = load(tmp_path, text.format(passive="{failures: 3}")).upstreams["api"].health.passive
    assert (passive.failures, passive.eject_for) == (3, 30.0)


def test_true_does_not_stand_for_a_block(tmp_path: Path) -> None:
    error = load_error(tmp_path, "admin: true\n" + MINIMAL)
    assert issues(error) == {"admin": "expected a mapping, got True"}


@pytest.mark.parametrize(("written", "workers"), [("auto", "auto"), ("1", 1), ("8", 8)])
def test_workers_is_auto_or_a_number_of_processes(tmp_path: Path, written: str, workers: int | str) -> None:
    assert load(tmp_path, f"workers: {written}\n" + MINIMAL).workers == workers


@pytest.mark.parametrize(("written", "got"), [("0", "0"), ("lots", "'lots'"), ("-2", "-2"), ("true", "True"), ("1.5", "1.5")])
def test_workers_refuses_anything_else(tmp_path: Path, written: str, got: str) -> None:
    error = load_error(tmp_path, f"workers: {written}\n" + MINIMAL)
    assert issues(error) == {"workers": f"expected a number of processes (1 or more) or 'auto', got {got}"}


def targets_config(*targets: str) -> str:
    listed = ", ".join(f'"{target}"' for target in targets)
    return f"upstreams:\n  api:\n    targets: [{listed}]\nroutes:\n  - {{name: all, match: {{path: /}}, upstream: api}}\n"


def test_a_target_url_with_a_path_or_query_is_refused(tmp_path: Path) -> None:
    error = load_error(tmp_path, targets_config("http://10.0.0.5:8080", "http://10.0.0.5:8080/api", "http://10.0.0.6:8080?x=1", "ftp://10.0.0.7"))
    found = issues(error)
    assert set(found) == {"upstreams.api.targets[1]", "upstreams.api.targets[2]", "upstreams.api.targets[3]"}
    assert found["upstreams.api.targets[1]"] == "expected a target such as 'http://10.0.0.5:8080' (scheme, host, port; no path), got 'http://10.0.0.5:8080/api'"


def test_a_target_url_is_stored_as_its_origin(tmp_path: Path) -> None:
    config = load(tmp_path, targets_config("http://10.0.0.5:8080/", "https://api.example"))
    assert config.upstreams["api"].targets == ("http://10.0.0.5:8080", "https://api.example")


def test_an_upstream_needs_at_least_one_target(tmp_path: Path) -> None:
    error = load_error(tmp_path, "upstreams:\n  api: {targets: []}\nroutes:\n  - {name: all, match: {path: /}, upstream: api}\n")
    assert issues(error) == {"upstreams.api.targets": "expected at least 1 item(s)"}


def test_a_target_url_with_credentials_is_refused_rather_than_silently_stripped(tmp_path: Path) -> None:
    error = load_error(tmp_path, targets_config("http://gateway:s3cret@10.0.0.5:8080"))
    assert list(issues(error)) == ["upstreams.api.targets[0]"]


def match_config(path: str) -> str:
    return f'upstreams:\n  api: {{targets: [http://127.0.0.1:8081]}}\nroutes:\n  - {{name: r, match: {{path: "{path}"}}, upstream: api}}\n'


@pytest.mark.parametrize(("written", "stored"), [("/api/", "/api"), ("/api", "/api"), ("/", "/"), ("/%7Euser", "/~user")])
def test_a_normalised_match_path_is_accepted_and_stored_without_its_trailing_slash(tmp_path: Path, written: str, stored: str) -> None:
    assert load(tmp_path, match_config(written)).routes[0].match.path == stored


@pytest.mark.parametrize(("written", "normal"), [("/a//b", "/a/b"), ("/a/./b", "/a/b"), ("/a/../b", "/b")])
def test_a_match_path_that_is_not_normalised_is_refused_with_its_normal_form(tmp_path: Path, written: str, normal: str) -> None:
    error = load_error(tmp_path, match_config(written))
    assert issues(error) == {"routes[0].match.path": f"expected a normalised path such as {normal!r}, got {written!r}"}


def test_a_match_path_must_start_with_a_slash(tmp_path: Path) -> None:
    error = load_error(tmp_path, match_config("api"))
    assert issues(error) == {"routes[0].match.path": "expected a path such as '/api/products': the path must start with '/'"}


def test_a_match_path_with_a_fragment_is_refused(tmp_path: Path) -> None:
    error = load_error(tmp_path, match_config("/api#top"))
    assert issues(error) == {"routes[0].match.path": "expected a path such as '/api/products': a fragment is not part of a request target"}


def test_a_match_path_with_a_query_is_refused(tmp_path: Path) -> None:
    error = load_error(tmp_path, match_config("/api?version=2"))
    assert list(issues(error)) == ["routes[0].match.path"]


def test_lower_case_methods_are_refused_at_their_key_path(tmp_path: Path) -> None:
    error = load_error(tmp_path, "upstreams:\n  api: {targets: [http://127.0.0.1:8081]}\nroutes:\n  - {name: r, match: {path: /, methods: [GET, Head]}, upstream: api}\n")
    assert list(issues(error)) == ["routes[0].match.methods[1]"]


# ---------------------------------------------------------------------------------------------
# Immutability
# ---------------------------------------------------------------------------------------------


def test_config_objects_are_immutable(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        config.workers = 2
    with pytest.raises(ValidationError, match="frozen"):
        config.routes[0].match.path = "/admin"
    with pytest.raises(ValidationError, match="frozen"):
        config.upstreams["api"].timeouts.connect = 99.0
    assert isinstance(config.routes, tuple)
    assert isinstance(config.upstreams["api"].targets, tuple)
    assert (config.workers, config.routes[0].match.path) == (1, "/")


def test_the_upstreams_of_a_loaded_config_cannot_be_changed(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    with pytest.raises(TypeError):
        config.upstreams["evil"] = config.upstreams["api"]


# ---------------------------------------------------------------------------------------------
# Policy blocks and defaults
# ---------------------------------------------------------------------------------------------

STAMPED = """\
defaults:
  stamp: {value: from-defaults}
upstreams:
  api: {targets: [http://127.0.0.1:8081]}
routes:
  - name: inherits
    match: {path: /a}
    upstream: api
  - name: replaces
    match: {path: /b}
    upstream: api
    stamp: {}
  - name: switches-off
    match: {path: /c}
    upstream: api
    stamp: false
"""


def test_a_route_without_a_block_inherits_the_default_block(tmp_path: Path) -> None:
    config = load(tmp_path, STAMPED, policies=STAMP)
    route = config.routes[0]
    assert route.stamp is None
    assert effective_blocks(config, route) == {"stamp": StampSettings(value="from-defaults")}


def test_a_route_with_its_own_block_replaces_the_default_block_as_a_whole(tmp_path: Path) -> None:
    # `stamp: {}` is the block's own defaults, not the defaults block with nothing changed.
    config = load(tmp_path, STAMPED, policies=STAMP)
    assert effective_blocks(config, config.routes[1]) == {"stamp": StampSettings(value="x")}


def test_false_on_a_route_switches_a_block_off_even_when_defaults_has_it(tmp_path: Path) -> None:
    config = load(tmp_path, STAMPED, policies=STAMP)
    route = config.routes[2]
    assert route.stamp is False
    assert effective_blocks(config, route) == {}


def test_a_route_has_no_block_when_neither_it_nor_defaults_sets_one(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL, policies=STAMP)
    assert effective_blocks(config, config.routes[0]) == {}


def test_a_policy_block_is_refused_where_its_policy_is_not_registered(tmp_path: Path) -> None:
    error = load_error(tmp_path, STAMPED)
    assert set(issues(error)) == {"defaults.stamp", "routes[1].stamp", "routes[2].stamp"}


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("upstreams:\n  api: {targets: [http://127.0.0.1:8081]}\nroutes:\n  - {name: r, match: {path: /}, upstream: api, stamp: {valu: y}}\n", "routes[0].stamp.valu"),
        ("defaults:\n  stamp: {valeu: y}\n" + MINIMAL, "defaults.stamp.valeu"),
    ],
    ids=["on a route", "under defaults"],
)
def test_an_unknown_key_inside_a_policy_block_is_an_error_with_a_suggestion(tmp_path: Path, text: str, path: str) -> None:
    error = load_error(tmp_path, text, policies=STAMP)
    key = path.rsplit(".", 1)[-1]
    assert issues(error) == {path: f"unknown key {key!r}; did you mean 'value'? (known keys: value)"}


# ---------------------------------------------------------------------------------------------
# JSON Schema
# ---------------------------------------------------------------------------------------------

VALID_DOCUMENT: dict[str, Any] = {
    "listen": {"host": "127.0.0.1", "port": 8080, "trusted_proxies": ["10.0.0.0/8"], "limits": {"max_header_size": "16kb", "header_timeout": "10s"}},
    "workers": "auto",
    "admin": False,
    "upstreams": {
        "api": {
            "targets": ["http://127.0.0.1:8081"],
            "balance": "least_conn",
            "timeouts": {"connect": "250ms", "read": 30},
            "health": {"passive": False, "active": {"path": "/health", "interval": "10s"}},
        }
    },
    "logging": {"level": "info", "format": "json", "access_log": True},
    "routes": [
        {"name": "products", "match": {"path": "/api/products", "methods": ["GET", "HEAD"]}, "upstream": "api"},
        {"name": "versioned", "match": {"path_regex": "^/api/v[0-9]+/"}, "upstream": "api"},
    ],
}


def schema_errors(document: Any, policies: tuple[type, ...] | None = None) -> list[tuple[list[Any], str]]:
    validator = Draft202012Validator(json_schema(policies))
    return sorted((list(error.absolute_path), error.message) for error in validator.iter_errors(document))


def test_the_shipped_schema_file_is_the_generated_schema() -> None:
    regenerate = "run `gateway schema > gateway/gateway.schema.json`"
    if not SCHEMA_PATH.exists():
        pytest.fail(f"{SCHEMA_PATH} does not exist: {regenerate}")
    assert json.loads(SCHEMA_PATH.read_text(encoding="utf-8")) == json.loads(json_schema_text()), f"{SCHEMA_PATH} is out of date: {regenerate}"


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = json_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "gateway.yaml"


def test_a_valid_config_validates_against_the_schema_and_loads() -> None:
    assert schema_errors(VALID_DOCUMENT) == []
    parse_config(VALID_DOCUMENT, environ={})


def test_an_unknown_key_fails_the_schema() -> None:
    document = json.loads(json.dumps(VALID_DOCUMENT))
    document["upstreams"]["api"]["timeouts"]["conect"] = "1s"
    assert schema_errors(document) == [(["upstreams", "api", "timeouts"], "Additional properties are not allowed ('conect' was unexpected)")]


@pytest.mark.parametrize(
    ("where", "value"),
    [(("listen", "port"), "eighty"), (("workers",), "lots"), (("upstreams", "api", "timeouts", "connect"), "15 minutes"), (("admin",), True)],
)
def test_a_value_of_the_wrong_type_fails_the_schema(where: tuple[str, ...], value: Any) -> None:
    document = json.loads(json.dumps(VALID_DOCUMENT))
    parent = document
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    assert [path for path, _ in schema_errors(document)] == [list(where)]


def test_variable_references_are_accepted_by_the_schema_where_typed_values_are_expected() -> None:
    document = json.loads(json.dumps(VALID_DOCUMENT))
    document["listen"]["port"] = "${PORT}"
    document["listen"]["limits"]["max_header_size"] = "${HEADER_SIZE:-16kb}"
    document["workers"] = "${WORKERS}"
    document["upstreams"]["api"]["timeouts"]["connect"] = "${CONNECT_TIMEOUT:-2s}"
    document["upstreams"]["api"]["retries"] = "${RETRIES}"
    document["logging"]["access_log"] = "${ACCESS_LOG:-true}"
    assert schema_errors(document) == []
    environ = {"PORT": "8081", "WORKERS": "2", "RETRIES": "0"}
    config = parse_config(document, environ=environ)
    assert (config.listen.port, config.workers, config.upstreams["api"].retries, config.logging.access_log) == (8081, 2, 0, True)


def test_policy_blocks_and_false_are_in_the_schema_of_a_registry() -> None:
    document = json.loads(json.dumps(VALID_DOCUMENT))
    document["defaults"] = {"stamp": {"value": "d"}}
    document["routes"][0]["stamp"] = False
    assert schema_errors(document, STAMP) == []
    document["routes"][1]["stamp"] = {"valu": "y"}
    assert [path for path, _ in schema_errors(document, STAMP)] == [["routes", 1, "stamp"]]


def test_methods_are_case_sensitive_in_the_loader_and_the_schema_alike() -> None:
    # RFC 9110 §9.1: method names are case-sensitive; "get" is not GET.
    document = json.loads(json.dumps(VALID_DOCUMENT))
    document["routes"][0]["match"]["methods"] = ["get"]
    with pytest.raises(ConfigError) as caught:
        parse_config(document, environ={})
    assert list(issues(caught.value)) == ["routes[0].match.methods[0]"]
    assert schema_errors(document) != []

def test_an_empty_block_is_an_error_not_a_silent_switch_off(tmp_path: Path) -> None:
    # `admin:` with every line under it commented out reads as null: say so instead of guessing.
    error = load_error(tmp_path, "admin:\n  # port: 9090\n" + MINIMAL)
    assert issues(error) == {"admin": "expected a mapping, or false to switch it off; the block is empty"}
    assert load(tmp_path, "admin: false\n" + MINIMAL).admin is None
