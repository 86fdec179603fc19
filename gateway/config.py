"""gateway.yaml → frozen, typed config objects (the contract is ../CONFIG.md).

Loading goes: YAML (duplicate keys refused) → ``${VAR}`` interpolation in string values →
validation against :class:`GatewayConfig` → cross-reference checks. Every problem found is
reported at once as a :class:`~gateway.errors.ConfigError` naming the file and the key path.

The per-route policy blocks are not written here: each policy in :data:`gateway.policies.POLICIES`
brings its own settings model, and :func:`config_model` builds the route and defaults models from
that registry, so adding a policy never touches this file.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import typing
import warnings
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, Sequence
from urllib.parse import unquote

import yaml
import yarl
from pydantic import AfterValidator, BaseModel, Field, ValidationError, WrapValidator, create_model, field_validator, model_validator
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticCustomError, core_schema

from gateway.errors import ConfigError, ConfigIssue
from gateway.settings import ENV_REFERENCE_SCHEMA, ConfigFile, Duration, Network, Settings, Size, did_you_mean
from gateway.tls import INTERMEDIATE_CIPHERS, server_context

DEFAULT_PATH = "gateway.yaml"
SCHEMA_PATH = Path(__file__).with_name("gateway.schema.json")

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

# ---------------------------------------------------------------------------------------------
# Blocks that are not policies
# ---------------------------------------------------------------------------------------------


class ListenLimits(Settings):
    max_header_size: Size = Field(16384, gt=0, description="request line + headers; 431 beyond")
    max_headers: int = Field(100, gt=0, description="number of header fields; 431 beyond")
    max_request_line: Size = Field(8192, gt=0, description="method + target + version; 414 beyond")
    header_timeout: Duration = Field(10.0, gt=0, description="time to receive a whole request head; 408 after")
    body_timeout: Duration = Field(60.0, gt=0, description="longest wait between two reads of a request body; 408 after")
    keepalive_timeout: Duration = Field(75.0, ge=0, description="idle client connections are closed after this")
    max_connections: int = Field(
        10000, gt=0, description="client connections per process; beyond, the longest-idle one is closed, or the new one when none is idle"
    )
    drain_timeout: Duration = Field(30.0, ge=0, description="on SIGTERM, in-flight requests get this long to finish")


class RedirectHttp(Settings):
    host: str | None = Field(None, description="address of the plain-HTTP listener; default: listen.host")
    port: int = Field(80, ge=0, le=65535)
    https_port: int | None = Field(None, ge=1, le=65535, description="the port in the Location; default: listen.port")


class Tls(Settings):
    cert: ConfigFile = Field(description="PEM certificate chain, leaf first (relative to the config file)")
    key: ConfigFile = Field(description="PEM private key of the certificate")
    min_version: Literal["1.2", "1.3"] = "1.2"
    ciphers: str = Field(INTERMEDIATE_CIPHERS, description="OpenSSL cipher list for TLS 1.2 (TLS 1.3's suites are OpenSSL's)")
    redirect_http: RedirectHttp | None = Field(None, description="a plain-HTTP listener that redirects every request to HTTPS")

    @model_validator(mode="after")
    def _usable(self) -> "Tls":
        try:
            server_context(self.cert, self.key, self.min_version, self.ciphers)
        except (OSError, ssl.SSLError) as exc:
            raise PydanticCustomError("tls", "cannot serve {cert} with {key}: {why}", {"cert": str(self.cert), "key": str(self.key), "why": exc.strerror or str(exc)})
        return self


class Listen(Settings):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    trusted_proxies: tuple[Network, ...] = Field((), description="peers whose X-Forwarded-* headers are believed")
    limits: ListenLimits = ListenLimits()
    escaped_slashes: Literal["reject", "keep"] = Field(
        "reject", description="%2F or %5C in a path: refuse with 400 (default), or keep as part of a segment"
    )
    tls: Tls | None = Field(None, description="TLS termination on this listener")


class Admin(Settings):
    host: str = "127.0.0.1"
    port: int = Field(9090, ge=0, le=65535)
    token: str = Field("", description="when set, mutating admin calls need 'Authorization: Bearer <token>'")
    unready_when_degraded: tuple[Literal["upstreams", "redis", "jwks"], ...] = Field(
        (), description="checks whose degradation makes /readyz unready (503); by default degraded is still 200"
    )


class Timeouts(Settings):
    connect: Duration = Field(2.0, gt=0)
    read: Duration = Field(30.0, gt=0, description="longest wait for the next bytes of the upstream's response")


class PassiveHealth(Settings):
    failures: int = Field(5, gt=0, description="consecutive failures (connect errors, timeouts, 502/503/504)")
    eject_for: Duration = Field(30.0, gt=0)


class ActiveHealth(Settings):
    path: str = Field(pattern=r"^/", description="polled with GET on every target")
    interval: Duration = Field(10.0, gt=0)
    timeout: Duration = Field(2.0, gt=0)
    failures: int = Field(2, gt=0, description="consecutive failed checks before a target is marked down")
    successes: int = Field(1, gt=0, description="consecutive passed checks before it is marked up again")


def _off_or(value: Any, handler: core_schema.ValidatorFunctionWrapHandler) -> Any:
    """`false` switches a block off (None); anything else validates as the block."""
    if value is None:  # `admin:` with nothing under it: say so rather than guess
        raise PydanticCustomError("block", "expected a mapping, or false to switch it off; the block is empty")
    return None if value is False else handler(value)


def switchable(model: type[Settings]) -> Any:
    """A block that `false` switches off: it validates to None then."""
    return Annotated[model | None, WrapValidator(_off_or, json_schema_input_type=model | Literal[False])]


class Health(Settings):
    passive: switchable(PassiveHealth) = PassiveHealth()  # type: ignore[valid-type]
    active: ActiveHealth | None = None


def _target_url(value: Any) -> str:
    url = yarl.URL(value) if isinstance(value, str) else None
    if url is not None and (url.user or url.password):
        raise PydanticCustomError("target", "expected a target without credentials (they would be dropped), got {got}", {"got": repr(str(url.with_user(None)))})
    if url is None or url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/") or url.query_string:
        raise PydanticCustomError("target", "expected a target such as 'http://10.0.0.5:8080' (scheme, host, port; no path), got {got}", {"got": repr(value)})
    return str(url.origin())


TargetURL = Annotated[str, WrapValidator(lambda v, _h: _target_url(v)), Field(json_schema_extra={"format": "uri"})]


class UpstreamTls(Settings):
    verify: bool = Field(True, description="check https targets' certificates and names")
    ca_file: ConfigFile | None = Field(None, description="PEM file of the CAs to trust instead of the system's")
    server_name: str | None = Field(None, description="the name sent (SNI) and checked in the certificate instead of the target's host")


class Upstream(Settings):
    targets: tuple[TargetURL, ...] = Field(min_length=1)
    balance: Literal["round_robin", "least_conn", "random"] = "round_robin"
    timeouts: Timeouts = Timeouts()
    retries: int = Field(1, ge=0, description="extra attempts on another target; idempotent methods, connect errors/502/503")
    max_connections: int = Field(100, gt=0)
    keepalive_timeout: Duration = Field(
        4.0, ge=0, description="idle connections to the upstream are kept this long: below the upstream's own (Node and uvicorn close after 5 s)"
    )
    preserve_host: bool = Field(False, description="send the client's Host instead of the target's")
    tls: UpstreamTls = UpstreamTls()
    health: Health = Health()


class Match(Settings):
    path: str | None = Field(None, description="segment prefix on the normalised path: /api matches /api and /api/x")
    path_regex: re.Pattern[str] | None = Field(None, description="searched in the normalised, percent-decoded path")
    methods: tuple[Literal[METHODS], ...] | None = None  # type: ignore[valid-type]  # case-sensitive (RFC 9110 §9.1)
    host: str | None = Field(None, description="exact host or '*.example.com'")

    @field_validator("path")
    @classmethod
    def _normal_path(cls, value: str | None) -> str | None:
        from gateway.routing import BadPath, normalise_path

        if value is None:
            return None
        if "?" in value:
            raise PydanticCustomError("path", "expected a path without a query (routes match the path only), got {got}", {"got": repr(value)})
        try:
            normal = normalise_path(value)
        except BadPath as exc:
            raise PydanticCustomError("path", "expected a path such as '/api/products': {reason}", {"reason": str(exc)})
        if unquote(normal) not in (unquote(value), unquote(value).rstrip("/")):
            raise PydanticCustomError("path", "expected a normalised path such as {normal}, got {got}", {"normal": repr(normal), "got": repr(value)})
        # Routes match on the percent-decoded path (CONFIG.md, "Matching").
        return unquote(normal).rstrip("/") or "/"

    @field_validator("host")
    @classmethod
    def _lower_host(cls, value: str | None) -> str | None:
        return value.lower() if value else value

    @model_validator(mode="after")
    def _one_path(self) -> "Match":
        if self.path is not None and self.path_regex is not None:
            raise PydanticCustomError("match", "give either path or path_regex, not both")
        return self


RedisURL = Annotated[str, Field(pattern=r"^(redis|rediss|unix)://", json_schema_extra={"format": "uri"})]


class Sentinel(Settings):
    master: str = Field(description="the name Sentinel knows the master by")
    nodes: tuple[RedisURL, ...] = Field(min_length=1, description="Sentinel addresses, e.g. redis://10.0.0.5:26379")


class Redis(Settings):
    """Shared state for rate limits and the cache; without this block an embedded memory store serves."""

    url: RedisURL | None = Field(None, description="redis://, rediss:// or unix://")
    cluster_nodes: tuple[RedisURL, ...] | None = Field(None, description="Redis Cluster startup nodes, instead of url")
    sentinel: Sentinel | None = Field(None, description="a master found through Sentinel, instead of url")
    key_prefix: str = Field("gw:", description="every key the gateway writes starts with this")
    timeout: Duration = Field(0.05, gt=0, description="per command; slower counts as a failure")
    pool_size: int = Field(50, gt=0, description="connections per gateway process")
    on_failure: Literal["memory", "allow", "deny"] = Field(
        "memory", description="when Redis fails: enforce the limits per process (memory), let requests through (allow) or answer 503 (deny)"
    )

    @model_validator(mode="after")
    def _one_topology(self) -> "Redis":
        given = [name for name in ("url", "cluster_nodes", "sentinel") if getattr(self, name)]
        if len(given) != 1:
            raise PydanticCustomError("redis", "give exactly one of url, cluster_nodes or sentinel, got {got}", {"got": ", ".join(given) or "none"})
        return self


class ErrorTracking(Settings):
    sentry_dsn: str = Field("", description="Sentry DSN; empty: no error tracking (sentry-sdk is not loaded)")
    environment: str = "production"
    sample_rate: float = Field(1.0, ge=0, le=1, description="share of error events sent")
    traces_sample_rate: float = Field(0.0, ge=0, le=1, description="share of requests traced (performance)")
    scrub_headers: tuple[str, ...] = Field((), description="more request headers replaced by [Filtered] (Authorization and Cookie always are)")


class Logging(Settings):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: bool = True


def _workers(value: Any, handler: core_schema.ValidatorFunctionWrapHandler) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    if isinstance(value, str) and value.isdigit() and int(value) >= 1:
        return int(value)
    raise PydanticCustomError("workers", "expected a number of processes (1 or more) or 'auto', got {got}", {"got": repr(value)})


Workers = Annotated[int | Literal["auto"], WrapValidator(_workers)]

# ---------------------------------------------------------------------------------------------
# Routes and defaults, built from the policy registry
# ---------------------------------------------------------------------------------------------


class RouteBase(Settings):
    name: str = Field(pattern=NAME_PATTERN)
    match: Match
    upstream: str


class DefaultsBase(Settings):
    pass


class GatewayConfigBase(Settings):
    listen: Listen = Listen()
    workers: Workers = 1
    admin: switchable(Admin) = Admin()  # type: ignore[valid-type]
    upstreams: Annotated[dict[Annotated[str, Field(pattern=NAME_PATTERN)], Upstream], AfterValidator(MappingProxyType)] = Field(min_length=1)
    redis: Redis | None = None
    logging: Logging = Logging()
    error_tracking: ErrorTracking = ErrorTracking()

    def route_blocks(self) -> dict[str, Any]:  # overridden by config_model
        return {}


def _policy_field(settings_type: Any) -> Any:
    # A policy block: the policy's settings, or `false` to switch it off. Unset (None) inherits
    # the default block. The validator takes `false` before the settings type sees it, so errors
    # inside a block are reported at their own key path, not once per union branch.
    off_or_block = WrapValidator(_block_or_off, json_schema_input_type=settings_type | Literal[False] | None)
    return (Annotated[settings_type | None, off_or_block], None)


def _block_or_off(value: Any, handler: core_schema.ValidatorFunctionWrapHandler) -> Any:
    if value is None:
        raise PydanticCustomError("block", "expected the block's settings, or false to switch it off; the block is empty")
    return False if value is False else handler(value)


@cache
def config_model(policies: tuple[type, ...] | None = None) -> type[GatewayConfigBase]:
    """The GatewayConfig model for a policy registry (the project's own by default)."""
    if policies is None:
        from gateway.policies import POLICIES

        policies = POLICIES
    blocks = {policy.name: _policy_field(policy.settings_type) for policy in policies}
    with warnings.catch_warnings():
        # `validate` (a CONFIG.md block name) shadows pydantic's deprecated BaseModel.validate;
        # field values live on the instance, so route.validate is the block.
        warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)
        route = create_model("Route", __base__=RouteBase, **blocks)  # type: ignore[call-overload]
        defaults = create_model("Defaults", __base__=DefaultsBase, **blocks)  # type: ignore[call-overload]
    global_blocks = {
        policy.name: (policy.global_settings_type, policy.global_settings_type())
        for policy in policies
        if getattr(policy, "global_settings_type", None) is not None
    }
    model = create_model(  # type: ignore[call-overload]
        "GatewayConfig",
        __base__=GatewayConfigBase,
        defaults=(defaults, defaults()),
        routes=(tuple[route, ...], Field(min_length=1)),
        **global_blocks,
    )
    model.policy_names = tuple(policy.name for policy in policies)
    model.policies = policies
    return model


GatewayConfig = GatewayConfigBase  # for type hints: every config_model() result derives from it


def effective_blocks(config: Any, route: Any) -> dict[str, Any]:
    """The policy blocks a route runs with: its own block, else the default one; `false` is off."""
    chosen = {}
    for name in config.policy_names:
        block = getattr(route, name)
        if block is None:
            block = getattr(config.defaults, name)
        if block is not None and block is not False:
            chosen[name] = block
    return chosen


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# `$$`, a well-formed reference, or anything else that starts with `${` (refused, so that a
# shell-style `${NAME-default}` never becomes a literal secret).
_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{[^}]*\}?")


def interpolate(value: Any, environ: typing.Mapping[str, str], path: str, issues: list[ConfigIssue]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in string values; ``$$`` is a literal ``$``."""
    if isinstance(value, str):
        if "$" not in value:
            return value

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name is None:
                issues.append(ConfigIssue(path, f"malformed reference {match.group(0)!r}: write ${{NAME}} or ${{NAME:-default}}, or $$ for a literal $"))
                return ""
            current = environ.get(name)
            if current is None or (current == "" and default is not None):
                if default is None:
                    issues.append(ConfigIssue(path, f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)"))
                    return ""
                return default
            return current

        return _ENV.sub(substitute, value)
    if isinstance(value, dict):
        return {key: interpolate(item, environ, _join(path, key), issues) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ, f"{path}[{index}]", issues) for index, item in enumerate(value)]
    return value


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def load_config(
    path: str | os.PathLike[str],
    environ: typing.Mapping[str, str] | None = None,
    policies: tuple[type, ...] | None = None,
) -> GatewayConfigBase:
    """Read, interpolate and validate a config file. Raises ConfigError listing every issue."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, [ConfigIssue("", f"cannot read the file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(file, [ConfigIssue("", "the file is not UTF-8 text")]) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(file, [ConfigIssue("", f"{where}invalid YAML: {problem}")]) from None
    return parse_config(raw, file, Path(path).resolve().parent, environ, policies)


def parse_config(
    raw: Any,
    file: str = "<config>",
    base_dir: Path | None = None,
    environ: typing.Mapping[str, str] | None = None,
    policies: tuple[type, ...] | None = None,
) -> GatewayConfigBase:
    """Validate an already parsed document (what load_config does after reading YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(file, [ConfigIssue("", "expected a mapping of blocks (listen, upstreams, routes, ...) at the top")])
    issues: list[ConfigIssue] = []
    document = interpolate(raw, os.environ if environ is None else environ, "", issues)
    model = config_model(policies)
    config = None
    try:
        config = model.model_validate(document, context={"base_dir": base_dir or Path.cwd()})
    except ValidationError as exc:
        # A value left empty by a failed interpolation is reported once, as that failure.
        failed = {issue.path for issue in issues}
        issues += [issue for issue in _issues_from(exc, model, document) if issue.path not in failed]
    issues += _cross_references(document)
    if config is not None:
        for policy in model.policies:
            if hasattr(policy, "config_issues"):
                issues += policy.config_issues(config)
    if issues:
        raise ConfigError(file, issues)
    assert config is not None
    return config


def _cross_references(document: dict[str, Any]) -> list[ConfigIssue]:
    """Checks across blocks, on the document itself so they are reported with every other issue."""
    issues = []
    upstreams = document.get("upstreams")
    upstream_names = list(upstreams) if isinstance(upstreams, dict) else []
    routes = document.get("routes")
    names: dict[str, int] = {}
    for index, route in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(route, dict):
            continue
        name = route.get("name")
        if isinstance(name, str):
            if name in names:
                issues.append(ConfigIssue(f"routes[{index}].name", f"route name {name!r} is already used by routes[{names[name]}]"))
            names.setdefault(name, index)
        upstream = route.get("upstream")
        if isinstance(upstream, str) and isinstance(upstreams, dict) and upstream not in upstreams:
            issues.append(ConfigIssue(f"routes[{index}].upstream", f"unknown upstream {upstream!r}{did_you_mean(upstream, upstream_names)}"))
        match = route.get("match")
        if isinstance(match, dict) and match.get("path") is None and match.get("path_regex") is None:
            issues.append(ConfigIssue(f"routes[{index}].match", "give path (a prefix such as /api) or path_regex"))
    return issues


# Messages for pydantic's own error types, in the words of CONFIG.md.
_EXPECTED = {
    "missing": "required key is missing",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string (quote it in YAML)",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "regex_parsing": "expected a regular expression",
    "too_short": "expected at least {min_length} item(s)",
}


def _issues_from(error: ValidationError, model: type[BaseModel], document: Any) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    seen: set[str] = set()
    items = error.errors(include_url=False)
    failed_inside = {_clean_loc(item["loc"], document)[:-1] for item in items}
    for item in items:
        loc = _clean_loc(item["loc"], document)
        if item["type"] == "too_short" and any(inner[: len(loc)] == loc for inner in failed_inside):
            continue  # a list whose items failed is reported through those items
        path = _format_loc(loc)
        kind = item["type"]
        if kind == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            known = list(owner.model_fields) if owner else []
            message = f"unknown key {loc[-1]!r}{did_you_mean(str(loc[-1]), known)}"
            if known:
                message += f" (known keys: {', '.join(known)})"
        elif kind == "literal_error":
            message = f"expected one of {item['ctx']['expected']}, got {item.get('input')!r}"
        elif kind in _EXPECTED:
            message = _EXPECTED[kind].format(**item.get("ctx", {}))
            if kind != "missing" and not isinstance(item.get("input"), (dict, list)):
                message += f", got {item.get('input')!r}"
        else:
            message = item["msg"]
            if kind.startswith(("greater", "less", "string_pattern")):
                message = f"{message[0].lower()}{message[1:]}, got {item.get('input')!r}"
        text = f"{path}: {message}"
        if text not in seen:
            seen.add(text)
            issues.append(ConfigIssue(path, message))
    return issues


def _clean_loc(loc: Sequence[Any], document: Any) -> tuple[Any, ...]:
    """The key path the user wrote: pydantic adds entries for union branches and validators
    (such as 'function-wrap[...]') that are not keys; keep only what the document has."""
    kept = []
    current = document
    for index, part in enumerate(loc):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            current = current[part]
        elif index == len(loc) - 1 and isinstance(current, dict) and not (isinstance(part, str) and "[" in part):
            current = None  # a missing required key, named at the end of the path
        else:
            continue
        kept.append(part)
    return tuple(kept)


def _format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model class that sits at a location, walking field annotations."""
    current: Any = model
    for part in loc:
        current = _unwrap_model(current)
        if current is None:
            return None
        if isinstance(part, int):
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
        else:  # a dict's value type
            args = typing.get_args(current)
            current = args[-1] if args else None
    current = _unwrap_model(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    """From Annotated/Optional/tuple/list wrappers, the model or dict inside."""
    for _ in range(6):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin is dict:
            return annotation
        if not args:
            return annotation
        if origin is typing.Annotated:
            annotation = args[0]
            continue
        candidates = [a for a in args if a is not type(None) and a is not Ellipsis and typing.get_origin(a) is not Literal]
        annotation = candidates[0] if candidates else None
    return annotation


# ---------------------------------------------------------------------------------------------
# JSON Schema
# ---------------------------------------------------------------------------------------------


class _SchemaGenerator(GenerateJsonSchema):
    """Typed scalars also accept a `${VAR}` reference, which is replaced before validation."""

    def _with_env(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [schema, ENV_REFERENCE_SCHEMA]}

    def int_schema(self, schema: core_schema.IntSchema) -> dict[str, Any]:
        return self._with_env(super().int_schema(schema))

    def float_schema(self, schema: core_schema.FloatSchema) -> dict[str, Any]:
        return self._with_env(super().float_schema(schema))

    def bool_schema(self, schema: core_schema.BoolSchema) -> dict[str, Any]:
        return self._with_env(super().bool_schema(schema))


def json_schema(policies: tuple[type, ...] | None = None) -> dict[str, Any]:
    """The JSON Schema of gateway.yaml (shipped as gateway/gateway.schema.json)."""
    schema = config_model(policies).model_json_schema(schema_generator=_SchemaGenerator)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gateway.yaml"
    return schema


def json_schema_text(policies: tuple[type, ...] | None = None) -> str:
    return json.dumps(json_schema(policies), indent=2, sort_keys=True) + "\n"
