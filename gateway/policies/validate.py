"""The ``validate`` policy: content types, body size and per-field rules, like Joi with
abortEarly off: every invalid field is reported at once in a 422 problem's ``errors`` list, and
the upstream receives nothing.

``fields`` maps paths (``email``, ``address.city``, ``items[].sku``) to rules: ``type``,
``required``, ``format`` (email, url, uuid, ipv4, ipv6, domain, phone, date, date-time),
``min_length``/``max_length``, ``minimum``/``maximum``, ``enum``, ``pattern``. Patterns are
compiled at load; a pattern with a quantified group that itself holds a quantifier (``(a+)+``,
the shape of catastrophic backtracking) is refused, and a pattern only ever sees strings up to
its field's ``max_length`` (1024 when unset). Form bodies are strings: integer, number and
boolean rules check that the text parses as one.
"""

from __future__ import annotations

import collections
import datetime
import re
from typing import Any, Callable, Literal

import phonenumbers
import validators
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.body import BODY_METHODS, Body, media_type, read_body
from gateway.metrics import UNMATCHED
from gateway.pipeline import Exchange, Policy, PolicyContext, Reply, problem
from gateway.policies.sanitize import PATH, JsonLimits
from gateway.settings import Settings, Size

PATTERN_INPUT_LIMIT = 1024
_REPEAT = re.compile(r"[+*]|\{\d*,\d*\}")  # quantifiers that repeat without a small fixed count
_PHONE_TEXT = re.compile(r"\+?[0-9 ().-]{1,40}", re.ASCII)  # phonenumbers finds numbers inside any text
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")  # RFC 3339 §5.6

Format = Literal["email", "url", "uuid", "ipv4", "ipv6", "domain", "phone", "date", "date-time"]


class FieldRule(Settings):
    type: Literal["string", "integer", "number", "boolean", "object", "array"] | None = None
    required: bool = False
    format: Format | None = None
    phone_region: str | None = Field(None, pattern=r"^[A-Z]{2}$", description="format: phone: the region of national numbers (e.g. US); unset: E.164 only")
    min_length: int | None = Field(None, ge=0, description="characters of a string, items of an array")
    max_length: int | None = Field(None, ge=0)
    minimum: float | None = None
    maximum: float | None = None
    enum: tuple[str | int | float | bool, ...] | None = None
    pattern: re.Pattern[str] | None = Field(None, description="searched in the string (anchor it with ^...$)")

    @field_validator("pattern", mode="before")
    @classmethod
    def _safe_pattern(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if _repeats_a_repetition(value):
            raise PydanticCustomError(
                "pattern", "the pattern {got} repeats a group that itself repeats or alternates: it can take exponential time on a crafted input (ReDoS); rewrite it without nesting",
                {"got": repr(value)},
            )  # fmt: skip
        return _end_means_end(value)

    @model_validator(mode="after")
    def _coherent(self) -> "FieldRule":
        if self.phone_region and self.format != "phone":
            raise PydanticCustomError("rule", "phone_region applies to format: phone only")
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise PydanticCustomError("rule", "min_length is larger than max_length")
        return self


class ValidateSettings(Settings):
    max_body: Size = Field(1024 * 1024, gt=0, description="bodies larger than this are refused with 413")
    content_types: tuple[str, ...] | None = Field(None, description="media types accepted for bodies; others get 415")
    fields: dict[str, FieldRule] = Field({}, description="path → rules: email, address.city, items[].sku")
    additional_fields: Literal["allow", "strip", "reject"] = Field("allow", description="top-level fields not in `fields`")
    json_limits: JsonLimits = Field(JsonLimits(), description="guards on JSON bodies: nesting depth, members, string length")

    @field_validator("fields")
    @classmethod
    def _paths(cls, value: dict[str, FieldRule]) -> dict[str, FieldRule]:
        for path in value:
            if not re.match(PATH, path):
                raise PydanticCustomError("path", "expected a field path such as 'email', 'address.city' or 'items[].sku', got {got}", {"got": repr(path)})
        return value

    @field_validator("content_types")
    @classmethod
    def _lower(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return tuple(v.lower() for v in value) if value is not None else None


def _end_means_end(pattern: str) -> str:
    """``$`` as JavaScript (Joi, validator.js) reads it: the end of the string. Python's ``$``
    also matches before a final newline, so ``^[A-Z]{4}$`` would pass ``"ABCD\\n"``."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            lead = 2 if pattern.startswith("[^", i) else 1
            lead += 1 if pattern.startswith("]", i + lead) else 0
            out.append(pattern[i : i + lead])
            i += lead
            continue
        elif char == "$":
            char = r"\Z"
        out.append(char)
        i += 1
    return "".join(out)


def _repeats_a_repetition(pattern: str) -> bool:
    """Whether a repeated group holds, at any depth, a quantifier or an alternation: (a+)+,
    ((\\w+)\\s?)+, (a|aa)*, the shapes of catastrophic backtracking. Conservative: it also refuses
    some safe patterns such as (-[a-z]+)*."""
    risky: list[bool] = []  # per open group: whether it holds a quantifier or an alternation
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if char == "[":  # a class: its brackets and parentheses are literal (a leading ] too)
            i += 2 if pattern.startswith("[^", i) else 1
            i += 1 if pattern.startswith("]", i) else 0
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
        elif char == "(":
            risky.append(False)
        elif char == ")" and risky:
            inner = risky.pop()
            repeated = _REPEAT.match(pattern, i + 1) is not None
            if inner and repeated:
                return True
            if risky and (inner or repeated):
                risky[-1] = True
        elif char == "|" and risky:
            risky[-1] = True
        elif _REPEAT.match(pattern, i) and risky:
            risky[-1] = True
        i += 1
    return False


# -- formats --------------------------------------------------------------------------------


def _phone(value: str, region: str | None) -> bool:
    if not _PHONE_TEXT.fullmatch(value):
        return False
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.is_valid_number(number)


def _date(value: str) -> bool:
    if not _DATE.match(value):
        return False
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        return False
    return True


def _date_time(value: str) -> bool:
    if not _DATE_TIME.match(value):
        return False
    try:
        datetime.datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    except ValueError:
        return False
    return True


def _checker(check: Callable[..., Any]) -> Callable[[str, str | None], bool]:
    """A validators.* check called without its decorator, which reads os.environ on every call
    (RAISE_VALIDATION_ERROR) and turns these exceptions into a falsy ValidationError."""
    plain = getattr(check, "__wrapped__", check)

    def test(value: str, region: str | None) -> bool:
        try:
            return bool(plain(value))
        except (ValueError, TypeError, UnicodeError):
            return False

    return test


FORMATS = {
    "email": _checker(validators.email),
    "url": _checker(validators.url),
    "uuid": _checker(validators.uuid),
    "ipv4": _checker(validators.ipv4),
    "ipv6": _checker(validators.ipv6),
    "domain": _checker(validators.domain),
    "phone": _phone,
    "date": lambda v, r: _date(v),
    "date-time": lambda v, r: _date_time(v),
}


# -- checking -------------------------------------------------------------------------------


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _from_text(value: str, wanted: str) -> Any:
    """A form value as the type a rule wants, or the text itself when it does not parse."""
    try:
        if wanted == "integer" and re.fullmatch(r"-?\d+", value):
            return int(value)
        if wanted == "number":
            return float(value) if re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", value) else value
        if wanted == "boolean" and value in ("true", "false"):
            return value == "true"
    except ValueError:
        pass
    return value


def _in_enum(value: Any, options: tuple[Any, ...]) -> bool:
    # Python's True == 1 and False == 0; JSON's true is not 1.
    return any(value == option and isinstance(value, bool) == isinstance(option, bool) for option in options)


def check(path: str, value: Any, rule: FieldRule, from_form: bool) -> list[dict[str, str]]:
    """Every rule this value breaks (none when it is valid)."""
    if from_form and rule.type in ("integer", "number", "boolean") and isinstance(value, str):
        value = _from_text(value, rule.type)
    errors = []

    def fail(name: str, message: str) -> None:
        errors.append({"field": path, "rule": name, "message": message})

    kind = _type_of(value)
    if rule.type is not None and kind != rule.type and not (rule.type == "number" and kind == "integer"):
        fail("type", f"expected {rule.type}, got {kind}")
        return errors
    if rule.enum is not None and not _in_enum(value, rule.enum):
        fail("enum", f"expected one of {', '.join(map(str, rule.enum))}")
    if isinstance(value, (str, list)):
        if rule.min_length is not None and len(value) < rule.min_length:
            fail("min_length", f"expected at least {rule.min_length} {'characters' if isinstance(value, str) else 'items'}")
        if rule.max_length is not None and len(value) > rule.max_length:
            fail("max_length", f"expected at most {rule.max_length} {'characters' if isinstance(value, str) else 'items'}")
    if kind in ("integer", "number"):
        if rule.minimum is not None and value < rule.minimum:
            fail("minimum", f"expected at least {rule.minimum:g}")
        if rule.maximum is not None and value > rule.maximum:
            fail("maximum", f"expected at most {rule.maximum:g}")
    # A format or a pattern describes text: any other value breaks it (Joi's string().email()).
    if rule.format is not None and not (isinstance(value, str) and FORMATS[rule.format](value, rule.phone_region)):
        fail("format", f"expected a valid {rule.format}")
    if rule.pattern is not None:
        limit = rule.max_length if rule.max_length is not None else PATTERN_INPUT_LIMIT
        if not isinstance(value, str) or len(value) > limit or rule.pattern.search(value) is None:
            fail("pattern", "does not match the expected pattern")
    return errors


def values_at(document: Any, parts: list[str]) -> list[tuple[str, Any, bool]]:
    """(concrete path, value, present) for a path such as items[].sku, over every array item."""
    found: list[tuple[str, Any, bool]] = [("", document, True)]
    for part in parts:
        many = part.endswith("[]")
        name = part[:-2] if many else part
        nxt: list[tuple[str, Any, bool]] = []
        for prefix, value, present in found:
            here = f"{prefix}.{name}" if prefix else name
            if not present or not isinstance(value, dict) or name not in value:
                nxt.append((here, None, False))
                continue
            child = value[name]
            if many:
                if isinstance(child, list):
                    nxt.extend((f"{here}[{i}]", item, True) for i, item in enumerate(child))
                else:
                    nxt.append((here, child, True))  # not a list: the type rule says so
            else:
                nxt.append((here, child, True))
        found = nxt
    return found


class ValidatePolicy(Policy):
    name = "validate"
    settings_type = ValidateSettings

    def __init__(self, settings: ValidateSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        self.rules = [(path, path.split("."), rule) for path, rule in settings.fields.items()]
        self.top_level = frozenset(path.split(".")[0].removesuffix("[]") for path in settings.fields)
        self.content_types = frozenset(settings.content_types) if settings.content_types is not None else None
        self.guards = settings.json_limits.guards()
        self.timeout = context.config.listen.limits.body_timeout
        self.metrics = context.metrics
        self.route = context.route or UNMATCHED

    async def on_request(self, exchange: Exchange) -> Reply | None:
        if exchange.method not in BODY_METHODS or not exchange.request.body_exists:
            if self.rules and any(rule.required for _, _, rule in self.rules) and exchange.method in BODY_METHODS:
                return self._refuse(exchange, [{"field": path, "rule": "required", "message": "is required"} for path, _, rule in self.rules if rule.required])
            return None
        kind = media_type(exchange)
        if self.content_types is not None and kind not in self.content_types:
            self._count("content_type")
            return problem(exchange, 415, f"expected a body of type {', '.join(sorted(self.content_types))}")
        body = await read_body(exchange, self.settings.max_body, self.guards, self.timeout)
        if not isinstance(body, Body):
            self._count("too_large" if body.status == 413 else "malformed")
            return body
        if body.kind == "other":
            if self.rules and self.content_types is None:
                # Without content_types, a body the rules cannot be checked on must not pass them.
                self._count("content_type")
                return problem(exchange, 415, "expected a JSON or form body (the route validates fields)")
            return None  # rules apply to JSON and form bodies; this content type was allowed
        pairs = body.fields() if body.kind != "json" else []
        document = body.value if body.kind == "json" else dict(pairs)
        errors: list[dict[str, str]] = []
        if self.rules and not isinstance(document, dict):
            errors.append({"field": "", "rule": "type", "message": "expected a JSON object"})
            return self._refuse(exchange, errors)
        for path, parts, rule in self.rules:
            for concrete, value, present in values_at(document, parts):
                if not present or value is None:
                    if rule.required:
                        errors.append({"field": concrete, "rule": "required", "message": "is required"})
                    continue
                errors.extend(check(concrete, value, rule, body.kind != "json"))
        if body.kind != "json" and len(pairs) > len(document):
            errors.extend(self._check_earlier_copies(pairs))
        extra = [key for key in document if key not in self.top_level] if self.rules else []
        if extra and self.settings.additional_fields == "reject":
            errors.extend({"field": key, "rule": "additional", "message": "is not an accepted field"} for key in extra)
        if errors:
            return self._refuse(exchange, errors)
        if extra and self.settings.additional_fields == "strip":
            if body.kind == "json":
                body.value = {k: v for k, v in body.value.items() if k not in extra}
            elif body.kind == "multipart":
                body.value = [part for part in body.value if part.name not in extra]
            else:
                body.value = [(k, v) for k, v in body.value if k not in extra]
            body.changed = True
        return None

    def _check_earlier_copies(self, pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
        """A form field sent more than once: upstreams differ on which copy they read (first,
        last, all), so every copy is checked; the last one already was, with the document."""
        rules = {path: rule for path, parts, rule in self.rules if len(parts) == 1 and not path.endswith("[]")}
        remaining = collections.Counter(name for name, _ in pairs)
        errors = []
        for name, value in pairs:
            remaining[name] -= 1
            if remaining[name] and name in rules:
                errors.extend(check(name, value, rules[name], True))
        return errors

    def _refuse(self, exchange: Exchange, errors: list[dict[str, str]]) -> Reply:
        self._count(errors[0]["rule"])
        fields = sorted({e["field"] for e in errors if e["field"]})
        return problem(exchange, 422, f"invalid fields: {', '.join(fields)}" if fields else "the body is invalid", extra={"errors": errors})

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.validation_failures.labels(route=self.route, reason=reason).inc()
