"""The ``security_headers`` policy: helmet's response headers, kept as data, built once.

A route's block names a preset (``helmet`` by default, or ``strict``, or one defined under the
top-level ``security_headers.presets``) and overrides any part of it: the CSP as a map of
directives or a raw string, HSTS, Permissions-Policy, Cross-Origin-Embedder-Policy, and any
single header through ``headers:`` (a value, or ``false`` to drop it). Layers merge child over
parent: route block → preset → the preset it extends.

Everything is resolved and validated at config load (:func:`resolve` is also what ``gateway
check`` runs, so a bad directive is a config error with its key path). Per response the policy
removes the leak headers, fills the headers the upstream may keep, and does one dict update.

Decisions:
- The ``helmet`` preset is helmet 8.3.0's default set, header for header (its index.cjs:
  getDefaultDirectives and the per-header defaults); X-Powered-By is in ``remove``.
- Directive names are checked against the CSP Level 3 list (helmet only checks their shape), so
  ``frame-acestors`` is an error with a suggestion instead of a silently ignored directive. A raw
  CSP string is the escape hatch for directives newer than that list: only its syntax is checked.
- CSP keywords must be quoted (``'self'``); an unquoted ``self`` would be read by browsers as a
  host name (helmet refuses it the same way).
- ``keep_upstream`` headers are left as the upstream sent them and are never removed; the
  gateway's value fills in when the upstream sent none. All other gateway headers replace the
  upstream's, so a header is never sent twice.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Mapping

from pydantic import Field, WrapValidator, field_validator, model_validator
from pydantic_core import PydanticCustomError, core_schema

from gateway.errors import ConfigIssue
from gateway.forwarded import in_networks
from gateway.pipeline import Exchange, Policy, PolicyContext, Reply
from gateway.settings import FIELD_VALUE, TOKEN, Duration, Settings, did_you_mean, header_name


# CSP Level 3 (w3.org/TR/CSP3 §6) plus directives still in use from other specs.
CSP_DIRECTIVES = frozenset(
    {
        "default-src", "child-src", "connect-src", "fenced-frame-src", "font-src", "frame-src",
        "img-src", "manifest-src", "media-src", "object-src", "prefetch-src", "script-src",
        "script-src-elem", "script-src-attr", "style-src", "style-src-elem", "style-src-attr",
        "worker-src", "base-uri", "sandbox", "form-action", "frame-ancestors", "report-uri",
        "report-to", "require-trusted-types-for", "trusted-types", "upgrade-insecure-requests",
        "block-all-mixed-content", "webrtc",
    }
)  # fmt: skip
# Source keywords that browsers only understand quoted (helmet's SHOULD_BE_QUOTED).
CSP_KEYWORDS = frozenset(
    {
        "none", "self", "strict-dynamic", "report-sample", "inline-speculation-rules", "unsafe-inline",
        "unsafe-eval", "unsafe-hashes", "wasm-unsafe-eval", "unsafe-allow-redirects",
    }
)  # fmt: skip
CSP_QUOTED_PREFIXES = ("nonce-", "sha256-", "sha384-", "sha512-")

# Headers whose values are a closed set: a typo there silently disables the protection.
REFERRER_TOKENS = frozenset(
    {
        "no-referrer", "no-referrer-when-downgrade", "same-origin", "origin", "strict-origin",
        "origin-when-cross-origin", "strict-origin-when-cross-origin", "unsafe-url",
    }
)  # fmt: skip
ALLOWED_VALUES: dict[str, tuple[str, ...]] = {
    "cross-origin-embedder-policy": ("require-corp", "credentialless", "unsafe-none"),
    "cross-origin-opener-policy": ("same-origin", "same-origin-allow-popups", "noopener-allow-popups", "unsafe-none"),
    "cross-origin-resource-policy": ("same-origin", "same-site", "cross-origin"),
    "origin-agent-cluster": ("?1", "?0"),
    "x-content-type-options": ("nosniff",),
    "x-dns-prefetch-control": ("off", "on"),
    "x-download-options": ("noopen",),
    "x-frame-options": ("DENY", "SAMEORIGIN"),
    "x-permitted-cross-domain-policies": ("none", "master-only", "by-content-type", "all"),
    # "1" turns on the removed XSS auditor, which itself leaked data (OWASP Secure Headers).
    "x-xss-protection": ("0",),
}
# hstspreload.org: preload needs a year or more and includeSubDomains.
HSTS_PRELOAD_MIN_AGE = 31536000
HSTS = "Strict-Transport-Security"
DEFAULT_PRESET = "helmet"
# Headers that tell an attacker what runs behind the gateway.
LEAK_HEADERS = ("X-Powered-By", "Server", "X-AspNet-Version", "X-AspNetMvc-Version")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def _field_value(name: str, value: str) -> str:
    if not FIELD_VALUE.match(value) or value != value.strip():
        raise PydanticCustomError("header", "{name}: expected printable ASCII without line breaks or outer spaces, got {got}", {"name": name, "got": repr(value)})
    return value


def _known_value(name: str, value: str) -> str:
    lower = name.lower()
    if lower == "referrer-policy":
        tokens = [t.strip() for t in value.split(",")]
        bad = [t for t in tokens if t not in REFERRER_TOKENS]
        if bad or len(set(tokens)) != len(tokens):
            raise PydanticCustomError("header", "Referrer-Policy: expected tokens from {allowed}, got {got}", {"allowed": ", ".join(sorted(REFERRER_TOKENS)), "got": repr(value)})
    elif lower in ALLOWED_VALUES and value not in ALLOWED_VALUES[lower]:
        allowed = ALLOWED_VALUES[lower]
        raise PydanticCustomError("header", "{name}: expected one of {allowed}, got {got}", {"name": name, "allowed": ", ".join(allowed), "got": repr(value)})
    return value


CspValue = list[str] | str | bool | None


def csp_sources(directive: str, value: Any) -> tuple[str, ...] | None:
    """A directive's sources as a tuple (empty for a valueless directive); None drops it."""
    if directive not in CSP_DIRECTIVES:
        raise PydanticCustomError("csp", "unknown CSP directive {name}{hint}", {"name": repr(directive), "hint": did_you_mean(directive, CSP_DIRECTIVES)})
    if value is None or value is False:
        return None
    if value is True:
        return ()
    items = value.split() if isinstance(value, str) else [part for item in value for part in str(item).split()]
    for item in items:
        if ";" in item or "," in item:
            raise PydanticCustomError("csp", "{name}: a source may not contain ';' or ',' (they separate directives and policies), got {got}", {"name": directive, "got": repr(item)})
        if item in CSP_KEYWORDS or item.startswith(CSP_QUOTED_PREFIXES):
            raise PydanticCustomError("csp", "{name}: write \"'{item}'\" (CSP keywords are quoted; unquoted it is a host name)", {"name": directive, "item": item})
        _field_value(directive, item)
    return tuple(items)


class Csp(Settings):
    """Content-Security-Policy: directives merged over the preset's, or a raw policy string."""

    directives: dict[str, CspValue] | None = Field(
        None, description="directive → sources (a list, a string, true for a valueless directive, false/null to drop it)"
    )
    policy: str | None = Field(None, description="a raw policy string instead of directives (only its syntax is checked)")
    use_defaults: bool = Field(True, description="merge directives over the preset's; false: these directives only")
    report_only: bool | None = Field(None, description="send Content-Security-Policy-Report-Only instead")

    @field_validator("directives")
    @classmethod
    def _check_directives(cls, value: dict[str, CspValue] | None) -> dict[str, CspValue] | None:
        if value is not None:
            for name, sources in value.items():
                csp_sources(name, sources)
        return value

    @field_validator("policy")
    @classmethod
    def _check_policy(cls, value: str | None) -> str | None:
        if value is not None:
            if not value.strip():
                raise PydanticCustomError("csp", "expected a policy such as \"default-src 'self'\", got an empty string")
            _field_value("Content-Security-Policy", value)
        return value

    @model_validator(mode="after")
    def _one_form(self) -> "Csp":
        if self.directives is not None and self.policy is not None:
            raise PydanticCustomError("csp", "give either directives or policy, not both")
        return self


class Hsts(Settings):
    """Strict-Transport-Security (RFC 6797)."""

    max_age: Duration = Field(31536000.0, description="sent in whole seconds")
    include_subdomains: bool = True
    preload: bool = False
    over_http: bool = Field(
        False,
        description="send it on plain-HTTP requests too (browsers ignore it there, RFC 6797 §8.1); by default only over TLS or when a trusted proxy says X-Forwarded-Proto: https",
    )

    @model_validator(mode="after")
    def _preloadable(self) -> "Hsts":
        if self.preload and (self.max_age < HSTS_PRELOAD_MIN_AGE or not self.include_subdomains):
            raise PydanticCustomError("hsts", "preload needs max_age of at least 365d and include_subdomains: true (hstspreload.org), or the preload list refuses the site")
        return self

    def value(self) -> str:
        parts = [f"max-age={int(self.max_age)}"]
        if self.include_subdomains:
            parts.append("includeSubDomains")
        if self.preload:
            parts.append("preload")
        return "; ".join(parts)


_FEATURE = re.compile(r"^[a-z][a-z0-9-]*$")
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d+)?$|^https://\*\.[A-Za-z0-9.-]+(:\d+)?$")


def _permissions_policy(value: dict[str, list[str]]) -> str:
    """Structured-field form (RFC 8941): ``camera=(), geolocation=(self "https://x.example")``."""
    members = []
    for feature, allow in value.items():
        if not _FEATURE.match(feature):
            raise PydanticCustomError("permissions", "expected a feature name such as 'camera', got {got}", {"got": repr(feature)})
        if allow == ["*"]:
            members.append(f"{feature}=*")
            continue
        items = []
        for entry in allow:
            if entry == "self":
                items.append("self")
            elif _ORIGIN.match(entry):
                items.append(f'"{entry}"')
            else:
                raise PydanticCustomError("permissions", "{feature}: expected self, * or an origin such as 'https://maps.example', got {got}", {"feature": feature, "got": repr(entry)})
        members.append(f"{feature}=({' '.join(items)})")
    return ", ".join(members)


def _false_or(value: Any, handler: core_schema.ValidatorFunctionWrapHandler) -> Any:
    # `false` switches a part off; validating it apart keeps the other branches' errors out.
    return False if value is False else handler(value)


def _false_or_csp(value: Any, handler: core_schema.ValidatorFunctionWrapHandler) -> Any:
    return _false_or({"policy": value} if isinstance(value, str) else value, handler)


def switch(kind: Any, *, also: Any = None, validator: Any = _false_or) -> Any:
    """A part that `false` switches off (validates to False), None inherits from the preset."""
    accepted = kind | Literal[False] | None if also is None else kind | also | Literal[False] | None
    return Annotated[kind | None, WrapValidator(validator, json_schema_input_type=accepted)]


class SecurityHeadersSettings(Settings):
    """A route's ``security_headers`` block, and also the shape of a preset."""

    preset: str | None = Field(None, description="the preset to start from: helmet (default), strict, or one of security_headers.presets")
    csp: switch(Csp, also=str, validator=_false_or_csp) = Field(  # type: ignore[valid-type]
        None, description="a map (directives, report_only, ...), a raw policy string, or false"
    )
    hsts: switch(Hsts) = None  # type: ignore[valid-type]
    permissions_policy: switch(dict[str, list[str]] | str) = Field(  # type: ignore[valid-type]
        None, description="feature → allowlist (self, *, origins; [] for none), or a raw header value; off unless set"
    )
    cross_origin_embedder_policy: Literal["require-corp", "credentialless", "unsafe-none", False] | None = Field(
        None, description="off unless set, as in helmet: it breaks cross-origin resources without CORP"
    )
    reporting_endpoints: dict[str, str] | None = Field(None, description="name → URL, sent as Reporting-Endpoints for CSP report-to")
    headers: dict[str, str | Literal[False]] = Field({}, description="any single header: a value, or false to drop it")
    keep_upstream: tuple[str, ...] | None = Field(None, description="headers whose upstream value wins when the upstream sends one")
    remove: tuple[str, ...] | None = Field(None, description="headers removed from upstream responses (default: headers that leak internals)")

    @field_validator("headers", mode="before")
    @classmethod
    def _numbers_as_text(cls, value: Any) -> Any:
        # `X-XSS-Protection: 0` is a number in YAML; the header value is its text.
        if isinstance(value, dict):
            return {k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in value.items()}
        return value

    @field_validator("permissions_policy")
    @classmethod
    def _check_permissions(cls, value: Any) -> Any:
        if isinstance(value, dict):
            _permissions_policy(value)
        elif isinstance(value, str):
            _field_value("Permissions-Policy", value)
        return value

    @field_validator("reporting_endpoints")
    @classmethod
    def _check_endpoints(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name, url in (value or {}).items():
            if not TOKEN.match(name) or not re.match(r"^(https://|/)[^\s\"]*$", url):
                raise PydanticCustomError("reporting", "expected name: 'https://…' or a path, got {name}: {url}", {"name": repr(name), "url": repr(url)})
        return value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str | Literal[False]]) -> dict[str, str | Literal[False]]:
        seen: dict[str, str] = {}
        for name, header_value in value.items():
            header_name(name)
            if name.lower() in seen:
                raise PydanticCustomError("header", "{name} is given twice ({other})", {"name": name, "other": seen[name.lower()]})
            seen[name.lower()] = name
            if header_value is not False:
                _known_value(name, _field_value(name, header_value))
        return value

    @field_validator("keep_upstream", "remove")
    @classmethod
    def _check_names(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for name in value or ():
            header_name(name)
        return value


class SecurityHeadersGlobal(Settings):
    """The top-level ``security_headers`` block: named presets and the gateway's Server header."""

    presets: dict[str, SecurityHeadersSettings] = Field(
        {}, description="name → preset; a preset extends its `preset` (default: the built-in of the same name, else helmet)"
    )
    server: str | Literal[False] = Field(False, description="Server header on responses that carry none: a value, or false for none")

    @field_validator("server")
    @classmethod
    def _check_server(cls, value: str | Literal[False]) -> str | Literal[False]:
        return value if value is False else _field_value("server", value)


# ---------------------------------------------------------------------------------------------
# Built-in presets, as data
# ---------------------------------------------------------------------------------------------

PRESETS: dict[str, SecurityHeadersSettings] = {
    # helmet 8.3.0's defaults (helmet/index.cjs), header for header.
    "helmet": SecurityHeadersSettings.model_validate(
        {
            "csp": {
                "directives": {
                    "default-src": ["'self'"],
                    "base-uri": ["'self'"],
                    "font-src": ["'self'", "https:", "data:"],
                    "form-action": ["'self'"],
                    "frame-ancestors": ["'self'"],
                    "img-src": ["'self'", "data:"],
                    "object-src": ["'none'"],
                    "script-src": ["'self'"],
                    "script-src-attr": ["'none'"],
                    "style-src": ["'self'", "https:", "'unsafe-inline'"],
                    "upgrade-insecure-requests": True,
                },
            },
            "hsts": {"max_age": 31536000, "include_subdomains": True},
            "headers": {
                "Cross-Origin-Opener-Policy": "same-origin",
                "Cross-Origin-Resource-Policy": "same-origin",
                "Origin-Agent-Cluster": "?1",
                "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff",
                "X-DNS-Prefetch-Control": "off",
                "X-Download-Options": "noopen",
                "X-Frame-Options": "SAMEORIGIN",
                "X-Permitted-Cross-Domain-Policies": "none",
                "X-XSS-Protection": "0",
            },
            "keep_upstream": [],
            "remove": list(LEAK_HEADERS),
        }
    ),
    # For JSON APIs that no browser should render, frame or cache: nothing may load, nothing may
    # frame it (OWASP REST Security Cheat Sheet), and Cache-Control: no-store unless the upstream
    # (or the cdn policy) says otherwise.
    "strict": SecurityHeadersSettings.model_validate(
        {
            "preset": "helmet",
            "csp": {
                "use_defaults": False,
                "directives": {
                    "default-src": ["'none'"],
                    "base-uri": ["'none'"],
                    "form-action": ["'none'"],
                    "frame-ancestors": ["'none'"],
                },
            },
            "hsts": {"max_age": 63072000, "include_subdomains": True},
            "headers": {"X-Frame-Options": "DENY", "Cache-Control": "no-store"},
            "keep_upstream": ["Cache-Control"],
        }
    ),
}


# ---------------------------------------------------------------------------------------------
# Resolution: layers → the final header set
# ---------------------------------------------------------------------------------------------


class Resolved:
    """A preset chain merged into plain values: what the policy sends."""

    def __init__(self) -> None:
        self.directives: dict[str, tuple[str, ...]] = {}
        self.raw_csp: str | None = None
        self.csp_on = False
        self.report_only = False
        self.hsts: Hsts | None = None
        self.permissions: str | None = None
        self.coep: str | None = None
        self.endpoints: dict[str, str] = {}
        self.headers: dict[str, str | Literal[False]] = {}  # lower-case name → value, spelling below
        self.spelling: dict[str, str] = {}
        self.keep: tuple[str, ...] = ()
        self.remove: tuple[str, ...] = LEAK_HEADERS

    def apply(self, layer: SecurityHeadersSettings) -> None:
        csp = layer.csp
        if csp is False:
            self.csp_on = False
        elif csp is not None:
            assert isinstance(csp, Csp)
            self.csp_on = True
            if csp.policy is not None:
                self.raw_csp, self.directives = csp.policy, {}
            elif csp.directives is not None:
                base = self.directives if csp.use_defaults and self.raw_csp is None else {}
                merged = dict(base)
                for name, value in csp.directives.items():
                    sources = csp_sources(name, value)
                    if sources is None:
                        merged.pop(name, None)
                    else:
                        merged[name] = sources
                self.raw_csp, self.directives = None, merged
            if csp.report_only is not None:
                self.report_only = csp.report_only
        if layer.hsts is not None:
            self.hsts = layer.hsts or None
        if layer.permissions_policy is not None:
            policy = layer.permissions_policy
            self.permissions = None if policy is False else (policy if isinstance(policy, str) else _permissions_policy(policy))
        if layer.cross_origin_embedder_policy is not None:
            self.coep = layer.cross_origin_embedder_policy or None
        if layer.reporting_endpoints is not None:
            self.endpoints = dict(layer.reporting_endpoints)
        for name, value in layer.headers.items():
            self.headers[name.lower()] = value
            self.spelling[name.lower()] = name
        if layer.keep_upstream is not None:
            self.keep = layer.keep_upstream
        if layer.remove is not None:
            self.remove = layer.remove

    def csp_value(self) -> str | None:
        if not self.csp_on:
            return None
        if self.raw_csp is not None:
            return self.raw_csp
        if "default-src" not in self.directives:
            # helmet's rule: without default-src every fetch directive left out allows anything.
            raise ValueError("the CSP needs a default-src (without it, every type not listed may load from anywhere)")
        # helmet's serialisation: directives joined with ';', sources with ' '.
        return ";".join(" ".join((name, *sources)) for name, sources in self.directives.items())

    def header_values(self) -> dict[str, str]:
        """Every header the gateway sets, by its spelling (values already validated)."""
        values: dict[str, str] = {}
        csp = self.csp_value()
        if csp is not None:
            values["Content-Security-Policy-Report-Only" if self.report_only else "Content-Security-Policy"] = csp
        if self.hsts is not None:
            values["Strict-Transport-Security"] = self.hsts.value()
        if self.permissions is not None:
            values["Permissions-Policy"] = self.permissions
        if self.coep is not None:
            values["Cross-Origin-Embedder-Policy"] = self.coep
        if self.endpoints:
            values["Reporting-Endpoints"] = ", ".join(f'{name}="{url}"' for name, url in self.endpoints.items())
        lower = {name.lower(): name for name in values}
        for name, value in self.headers.items():
            values.pop(lower.pop(name, ""), None)  # `headers:` wins over the structured keys
            if value is not False:
                values[self.spelling[name]] = value
        return values


def resolve(block: SecurityHeadersSettings, presets: Mapping[str, SecurityHeadersSettings]) -> Resolved:
    """Merge a block over its preset chain. Raises ValueError with a message for the user.

    A preset extends the one its ``preset`` names; without one, a user preset extends the
    built-in of the same name (so ``presets: {helmet: {...}}`` adjusts helmet everywhere), and a
    new name extends helmet.
    """
    chain = [block]
    name: str | None = block.preset or DEFAULT_PRESET
    seen: list[str] = []
    while name is not None:
        if name in seen:
            raise ValueError(f"presets extend each other in a circle: {' → '.join([*seen, name])}")
        seen.append(name)
        user, builtin = presets.get(name), PRESETS.get(name)
        if user is None and builtin is None:
            known = sorted({*PRESETS, *presets})
            raise ValueError(f"unknown preset {name!r}{did_you_mean(name, known)} (known: {', '.join(known)})")
        if user is not None:
            chain.append(user)
            if user.preset is not None and user.preset != name:
                name = user.preset
                continue
        if builtin is not None:
            chain.append(builtin)
            name = builtin.preset
        else:
            name = DEFAULT_PRESET
    resolved = Resolved()
    for layer in reversed(chain):
        resolved.apply(layer)
    resolved.header_values()  # raises for a CSP without default-src
    return resolved


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------


class SecurityHeadersPolicy(Policy):
    """Sets the resolved security headers on every response of the route (upstream or local)."""

    name = "security_headers"
    settings_type = SecurityHeadersSettings
    global_settings_type: ClassVar[Any] = SecurityHeadersGlobal

    def __init__(self, settings: SecurityHeadersSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        presets = context.config.security_headers.presets
        resolved = resolve(settings, presets)
        values = resolved.header_values()
        keep = {name.lower() for name in resolved.keep}
        self.remove = tuple(name for name in resolved.remove if name.lower() not in keep)
        self.fill = tuple((name, value) for name, value in values.items() if name.lower() in keep)
        self.set = {name: value for name, value in values.items() if name.lower() not in keep}
        # HSTS only where the client reached the site over TLS, unless told otherwise.
        self.hsts: tuple[str, bool] | None = None  # (value, only when the upstream sent none)
        if resolved.hsts is None or not resolved.hsts.over_http:
            for name in [name for name in self.set if name.lower() == HSTS.lower()]:
                self.hsts = (self.set.pop(name), False)
            for name, value in [(n, v) for n, v in self.fill if n.lower() == HSTS.lower()]:
                self.hsts = (value, True)
                self.fill = tuple(pair for pair in self.fill if pair[0] != name)
        self.trusted = context.config.listen.trusted_proxies

    def on_response(self, exchange: Exchange, reply: Reply) -> None:
        headers = reply.headers
        for name in self.remove:
            if name in headers:
                del headers[name]
        for name, value in self.fill:
            if name not in headers:
                headers[name] = value
        headers.update(self.set)
        if self.hsts is not None and self._over_tls(exchange):
            value, fill = self.hsts
            if not (fill and HSTS in headers):
                headers[HSTS] = value

    def _over_tls(self, exchange: Exchange) -> bool:
        request = exchange.request
        if request.transport is not None and request.transport.get_extra_info("sslcontext") is not None:
            return True
        proto = request.headers.get("X-Forwarded-Proto")
        return proto is not None and proto.rpartition(",")[2].strip().lower() == "https" and in_networks(request.remote, self.trusted)

    @classmethod
    def config_issues(cls, config: Any) -> list[ConfigIssue]:
        """Unknown presets, circles and CSPs without default-src, with their key paths."""
        presets = config.security_headers.presets
        blocks: list[tuple[str, SecurityHeadersSettings]] = [
            (f"security_headers.presets.{name}", preset) for name, preset in presets.items()
        ]
        if isinstance(config.defaults.security_headers, SecurityHeadersSettings):
            blocks.append(("defaults.security_headers", config.defaults.security_headers))
        for index, route in enumerate(config.routes):
            if isinstance(route.security_headers, SecurityHeadersSettings):
                blocks.append((f"routes[{index}].security_headers", route.security_headers))
        issues = []
        for path, block in blocks:
            try:
                resolve(block, presets)
            except ValueError as exc:
                issues.append(ConfigIssue(path, str(exc)))
        return issues

