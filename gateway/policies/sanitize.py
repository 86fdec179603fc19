"""The ``sanitize`` policy: HTML out of request bodies (JSON, forms) and, optionally, queries.

``mode: strip`` rewrites every string value (or only ``fields``) with the route's Cleaner
(gateway.sanitizer: nh3 by default, bleach selectable); ``mode: reject`` answers 422 naming
every field that held markup, and forwards nothing. Non-string JSON values are never touched;
strings without ``<`` skip the engine (with HTML output, only those without ``&`` and ``>`` too:
``Cleaner.unchanged``). The rewritten body is serialized once, with its new Content-Length
(gateway.body). Other content types pass through untouched.

Field paths: ``bio``, ``address.city``, ``items[].note`` (every item of the array); a rejection
names the item (``items[1].note``). Form fields are named by their field name; query parameters
likewise.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.body import BODY_METHODS, Body, JsonGuards, media_type, read_body, readable
from gateway.metrics import UNMATCHED
from gateway.pipeline import Exchange, Policy, PolicyContext, Reply, problem
from gateway.sanitizer import Cleaner
from gateway.settings import Settings, Size

PATH = r"^[A-Za-z0-9_$-]+(\[\])?(\.[A-Za-z0-9_$-]+(\[\])?)*$"
_ITEM = re.compile(r"\[\d+\]")  # items[1].note → items[].note, to match ``fields``


class JsonLimits(Settings):
    max_depth: int = Field(32, gt=0, description="nesting of objects and arrays")
    max_members: int = Field(1000, gt=0, description="keys of one object or items of one array (form fields too)")
    max_string: int = Field(65536, gt=0, description="characters of one string or key")

    def guards(self) -> JsonGuards:
        return JsonGuards(self.max_depth, self.max_members, self.max_string)


class SanitizeSettings(Settings):
    mode: Literal["strip", "reject", "off"] = Field("strip", description="strip markup, reject requests holding markup (422), or off")
    engine: Literal["nh3", "bleach"] = Field("nh3", description="nh3 (maintained, default) or bleach (unmaintained since 6.4.0)")
    output: Literal["text", "html"] = Field("text", description="text: plain strings (Tom & Jerry); html: HTML-escaped (Tom &amp; Jerry)")
    escape: bool = Field(False, description="bleach only: turn markup into visible text instead of dropping it")
    allowed_tags: tuple[str, ...] = Field((), description="elements kept, for rich-text fields (default: none)")
    allowed_attributes: dict[str, tuple[str, ...]] = Field({}, description="element → attributes kept")
    allowed_protocols: tuple[str, ...] = Field(("http", "https", "mailto"), description="URL schemes kept in allowed attributes")
    fields: tuple[str, ...] | None = Field(None, description="only these paths (bio, items[].note); default: every string")
    keys: bool = Field(False, description="sanitize object keys and form field names too")
    query: bool = Field(False, description="sanitize (or reject) query-string parameters the same way")
    max_body: Size = Field(1024 * 1024, gt=0, description="bodies larger than this are refused with 413")
    json_limits: JsonLimits = Field(JsonLimits(), description="guards on JSON bodies: nesting depth, members, string length")

    @field_validator("fields")
    @classmethod
    def _paths(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        import re

        for path in value or ():
            if not re.match(PATH, path):
                raise PydanticCustomError("path", "expected a field path such as 'bio', 'address.city' or 'items[].note', got {got}", {"got": repr(path)})
        return value

    @model_validator(mode="after")
    def _escape_is_bleach(self) -> "SanitizeSettings":
        if self.escape and self.engine != "bleach":
            raise PydanticCustomError("escape", "escape needs engine: bleach (nh3 always drops markup)")
        return self


def walk(value: Any, path: str, visit: Any, keys: bool) -> Any:
    """Call ``visit(path, string)`` for every string of a JSON value; return the new value.

    Paths name the item (``items[1].note``), so a rejection names each field that held markup;
    ``fields`` are matched with the indexes written ``[]`` (``items[].note``).
    """
    if isinstance(value, str):
        return visit(path, value)
    if isinstance(value, list):
        return [walk(item, f"{path}[{index}]", visit, keys) for index, item in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            new_key = visit(child + "#key", key) if keys else key
            out[new_key] = walk(item, child, visit, keys)
        return out
    return value


def might_hold_markup(raw: bytes, kind: str) -> bool:
    """False when no value of the body can contain "<": JSON may also write it \\u003c, a form
    %3C; a multipart body is checked whole."""
    if b"<" in raw:
        return True
    if kind == "json":
        return b"\\u003c" in raw.lower()
    if kind == "form":
        return b"%3c" in raw.lower()
    return False


class SanitizePolicy(Policy):
    name = "sanitize"
    settings_type = SanitizeSettings

    def __init__(self, settings: SanitizeSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        self.cleaner = Cleaner(
            settings.engine,
            frozenset(settings.allowed_tags),
            {tag: frozenset(names) for tag, names in settings.allowed_attributes.items()},
            frozenset(settings.allowed_protocols),
            settings.output,
            settings.escape,
        )
        self.fields = frozenset(settings.fields) if settings.fields is not None else None
        self.reject = settings.mode == "reject"
        self.off = settings.mode == "off"
        self.guards = settings.json_limits.guards()
        self.timeout = context.config.listen.limits.body_timeout
        self.metrics = context.metrics
        self.route = context.route or UNMATCHED

    async def on_request(self, exchange: Exchange) -> Reply | None:
        if self.off:
            return None
        found: list[str] = []
        if self.settings.query and exchange.query:
            self._query(exchange, found)
        if exchange.method in BODY_METHODS and exchange.request.body_exists:
            reply = await self._body(exchange, found)
            if reply is not None:
                return reply
        if found:
            if self.metrics is not None:
                self.metrics.sanitize_rejections.labels(route=self.route, reason="markup").inc()
            errors = [{"field": path, "rule": "markup", "message": "contains HTML markup"} for path in found]
            return problem(exchange, 422, "fields contain HTML markup", extra={"errors": errors})
        return None

    def _visit(self, found: list[str]) -> Any:
        cleaner, fields, reject = self.cleaner, self.fields, self.reject
        unchanged, text_out = cleaner.unchanged, not cleaner.html_out

        def visit(path: str, value: str) -> str:
            # The hot path: nothing an HTML parser would read as markup (and, for HTML output,
            # nothing to escape: Cleaner.unchanged); the text case without a method call.
            if "<" not in value and (text_out or unchanged(value)):
                return value
            field = path[:-4] if path.endswith("#key") else path
            if fields is not None and _ITEM.sub("[]", field) not in fields:
                return value
            if reject:
                if cleaner.has_markup(value):
                    found.append(field)
                return value
            return cleaner.clean(value)

        return visit

    async def _body(self, exchange: Exchange, found: list[str]) -> Reply | None:
        if not readable(media_type(exchange)):
            return None  # not a body this policy reads: it streams through untouched
        body = await read_body(exchange, self.settings.max_body, self.guards, self.timeout)
        if not isinstance(body, Body):
            return body
        if not self.cleaner.html_out and not might_hold_markup(body.raw, body.kind):
            return None  # the hot path: no string of this body can hold a "<" (text output)
        visit = self._visit(found)
        if body.kind == "multipart":
            for part in body.value:  # text fields only: file parts pass through untouched
                text = part.text()
                if part.name is not None and text is not None:
                    new = visit(part.name, text)
                    if new != text:
                        part.content = new.encode("utf-8")
                        body.changed = True
            return None
        if body.kind == "json":
            cleaned = walk(body.value, "", visit, self.settings.keys)
        else:
            cleaned = [
                (visit(name + "#key", name) if self.settings.keys else name, visit(name, value)) for name, value in body.value
            ]
        if cleaned != body.value:
            body.value = cleaned
            body.changed = True
        return None

    def _query(self, exchange: Exchange, found: list[str]) -> None:
        from urllib.parse import parse_qsl, urlencode

        pairs = parse_qsl(exchange.query, keep_blank_values=True)
        visit = self._visit(found)
        cleaned = [(visit(name + "#key", name) if self.settings.keys else name, visit(name, value)) for name, value in pairs]
        if cleaned != pairs and not self.reject:
            exchange.query = urlencode(cleaned)
