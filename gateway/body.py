"""Request bodies the gateway reads whole: bounded while reading, parsed once, re-serialized once.

Only routes with a sanitize or validate policy read bodies, and only for methods that carry one;
every other body streams to the upstream untouched. The first policy that needs the body reads
it (``max_body`` enforced chunk by chunk, so a chunked body without Content-Length is refused
with 413 as soon as it crosses the limit, and the upstream never sees a byte); the others reuse
what it parsed. JSON is parsed with guards (nesting depth, members per object or array, string
length); form bodies keep their field order. When a policy changed a value, the body is written
again once, with its new Content-Length, before it is forwarded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

from gateway.pipeline import Exchange, Reply, problem
from gateway.proxy import CONTINUE, ClientBodyError, next_chunk

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
STATE_KEY = "body"
Kind = Literal["json", "form", "multipart", "other"]
_BOUNDARY = re.compile(r'boundary="?([^";]{1,70})"?', re.IGNORECASE)
_PARAM = re.compile(rb';\s*(name|filename)="([^"]*)"', re.IGNORECASE)


class BodyError(Exception):
    """The body cannot be accepted; carries the 4xx to answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class JsonGuards:
    max_depth: int = 32
    max_members: int = 1000  # keys of one object, items of one array
    max_string: int = 65536  # characters of one string (keys included)


@dataclass
class Part:
    """One part of a multipart/form-data body, kept byte for byte unless a policy changes it."""

    head: bytes  # the part's header lines
    content: bytes
    name: str | None
    is_file: bool

    def text(self) -> str | None:
        """The value of a text field (None for files and undecodable content)."""
        if self.is_file:
            return None
        try:
            return self.content.decode("utf-8")
        except UnicodeDecodeError:
            return None


@dataclass
class Body:
    """A body read whole: its bytes, its kind and, for json and form, the parsed value."""

    raw: bytes
    media_type: str
    kind: Kind
    value: Any = None  # json: the document; form: (name, value) pairs; multipart: Parts
    boundary: bytes = b""  # multipart only
    changed: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    def serialize(self) -> bytes:
        if not self.changed:
            return self.raw
        if self.kind == "json":
            return json.dumps(self.value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if self.kind == "form":
            return urlencode(self.value).encode("ascii")
        if self.kind == "multipart":
            delimiter = b"--" + self.boundary
            parts = b"".join(delimiter + b"\r\n" + part.head + b"\r\n\r\n" + part.content + b"\r\n" for part in self.value)
            return parts + delimiter + b"--\r\n"
        return self.raw

    def fields(self) -> list[tuple[str, str]]:
        """(name, text) of every text field: form pairs, or multipart parts that are not files."""
        if self.kind == "form":
            return list(self.value)
        if self.kind == "multipart":
            return [(part.name, text) for part in self.value if part.name is not None and (text := part.text()) is not None]
        return []


def readable(kind: str) -> bool:
    """Whether the gateway parses bodies of this media type (others stream through untouched)."""
    return kind in ("application/json", "application/x-www-form-urlencoded", "multipart/form-data") or kind.endswith("+json")


def media_type(exchange: Exchange) -> str:
    return exchange.request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


async def read_body(exchange: Exchange, max_body: int, guards: JsonGuards, timeout: float) -> Body | Reply:
    """The request's body, read and parsed once per request; a Reply (413/400) when refused."""
    known = exchange.state.get(STATE_KEY)
    if known is not None:
        if len(known.raw) > max_body:
            return _too_large(exchange, max_body)
        return known
    request = exchange.request
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        # RFC 7694 §3: the policies check bytes they can read; a compressed body is refused, not
        # inflated here (where a small body can inflate to gigabytes).
        exchange.notes["body"] = "content_encoding"
        return problem(exchange, 415, "a compressed request body cannot be checked here; send it uncompressed", {"Accept-Encoding": "identity"})
    declared = request.content_length
    if declared is not None and declared > max_body:
        return _too_large(exchange, max_body)
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(CONTINUE)  # the policies want the body: ask for it
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await next_chunk(request.content, timeout):
            size += len(chunk)
            if size > max_body:
                return _too_large(exchange, max_body)
            chunks.append(chunk)
    except ClientBodyError as exc:
        return problem(exchange, exc.status, exc.detail)
    exchange.bytes_in = size
    raw = b"".join(chunks)
    kind_of = media_type(exchange)
    try:
        body = parse(raw, kind_of, guards, exchange.request.headers.get("Content-Type", ""))
    except BodyError as exc:
        return problem(exchange, exc.status, exc.detail)
    exchange.state[STATE_KEY] = body
    return body


def _too_large(exchange: Exchange, max_body: int) -> Reply:
    exchange.notes["body"] = "too_large"
    return problem(exchange, 413, f"the request body is larger than {max_body} bytes")


def parse(raw: bytes, kind: str, guards: JsonGuards, content_type: str = "") -> Body:
    if kind == "application/json" or kind.endswith("+json"):
        return Body(raw, kind, "json", parse_json(raw, guards))
    if kind == "application/x-www-form-urlencoded":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BodyError(400, "the form body is not UTF-8") from None
        try:
            pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=guards.max_members)
        except UnicodeDecodeError:  # percent-encoded bytes that are not UTF-8
            raise BodyError(400, "the form body is not UTF-8") from None
        except ValueError:
            raise BodyError(400, f"the form body has more than {guards.max_members} fields") from None
        return Body(raw, kind, "form", pairs)
    if kind == "multipart/form-data":
        return parse_multipart(raw, kind, content_type, guards)
    return Body(raw, kind, "other")


def parse_multipart(raw: bytes, kind: str, content_type: str, guards: JsonGuards) -> Body:
    """Split a multipart/form-data body (RFC 7578) into parts without decoding file contents."""
    match = _BOUNDARY.search(content_type)
    if match is None:
        if not raw:
            return Body(raw, kind, "multipart", [], b"")
        raise BodyError(400, "the multipart body has no boundary")
    boundary = match.group(1).encode("latin-1")
    delimiter = b"--" + boundary
    chunks = raw.split(delimiter)
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise BodyError(400, "the multipart body is malformed (no closing boundary)")
    parts = []
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise BodyError(400, "the multipart body is malformed")
        head, separator, content = chunk[2:-2].partition(b"\r\n\r\n")
        if not separator:
            raise BodyError(400, "a multipart part has no header block")
        disposition = next((line for line in head.split(b"\r\n") if line.lower().startswith(b"content-disposition:")), b"")
        params = {key.lower(): value for key, value in _PARAM.findall(disposition)}
        name = params[b"name"].decode("utf-8", "replace") if b"name" in params else None
        parts.append(Part(head, content, name, b"filename" in params))
        if len(parts) > guards.max_members:
            raise BodyError(400, f"the multipart body has more than {guards.max_members} parts")
    return Body(raw, kind, "multipart", parts, boundary)


def parse_json(raw: bytes, guards: JsonGuards) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError(400, "the JSON body is not UTF-8") from None
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise BodyError(400, f"the JSON body is nested deeper than {guards.max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise BodyError(400, f"the body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except ValueError:  # int(): more digits than sys.get_int_max_str_digits() (CVE-2020-10735)
        raise BodyError(400, "the JSON body holds a number too long to read") from None
    if not _within_guards(raw, guards):
        _check(document, guards, 1)
    return document


def _within_guards(raw: bytes, guards: JsonGuards) -> bool:
    """Whether the text alone shows every guard holds, so the walk over the document is not
    needed (most bodies): no container is nested deeper than the brackets the text holds, none
    has more members than its commas allow, no string is longer than the text, and an unpaired
    surrogate needs a \\u escape (the text was decoded as strict UTF-8)."""
    return (
        raw.count(b"[") + raw.count(b"{") <= guards.max_depth
        and raw.count(b",") + 1 <= guards.max_members
        and len(raw) <= guards.max_string
        and b"\\u" not in raw
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 8259 §4: with duplicate names, parsers disagree on which value wins; the gateway would
    # check one copy and forward the raw body, whose other copy the upstream may read.
    document = dict(pairs)
    if len(document) < len(pairs):  # a key came twice: name it (the common case stays in C)
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BodyError(400, f"the JSON body has a duplicate key {key[:64]!r}")
            seen.add(key)
    return document


def _no_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity; JSON has no such numbers (RFC 8259 §6).
    raise BodyError(400, f"the JSON body holds {name}, which is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise BodyError(400, f"the JSON body holds a number too large to represent: {text[:32]}")
    return value


def _check(value: Any, guards: JsonGuards, depth: int) -> None:
    if isinstance(value, str):
        if len(value) > guards.max_string:
            raise BodyError(400, f"a JSON string is longer than {guards.max_string} characters")
        _no_lone_surrogate(value)
        return
    if not isinstance(value, (dict, list)):
        return
    if depth > guards.max_depth:
        raise BodyError(400, f"the JSON body is nested deeper than {guards.max_depth} levels")
    if len(value) > guards.max_members:
        raise BodyError(400, f"a JSON object or array has more than {guards.max_members} members")
    if isinstance(value, dict):
        for key, item in value.items():
            if len(key) > guards.max_string:
                raise BodyError(400, f"a JSON key is longer than {guards.max_string} characters")
            _no_lone_surrogate(key)
            _check(item, guards, depth + 1)
    else:
        for item in value:
            _check(item, guards, depth + 1)


def _no_lone_surrogate(value: str) -> None:
    # RFC 8259 §8.2: "\ud800" alone is valid JSON text but no Unicode character; Python reads it
    # into a str that cannot be encoded (nh3, the re-serialized body and the upstream all fail).
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BodyError(400, "a JSON string holds an unpaired surrogate escape") from None


def forwarded_body(exchange: Exchange) -> bytes | None:
    """The body to send upstream when a policy read it (re-serialized if changed), else None."""
    body: Body | None = exchange.state.get(STATE_KEY)
    if body is None:
        return None
    data = body.serialize()
    if body.changed:
        exchange.upstream_headers["Content-Length"] = str(len(data))
    return data
