"""Building blocks of the typed configuration: the base model and the units of CONFIG.md.

Every config block is a frozen :class:`Settings` model; unknown keys are errors. Durations
(``250ms``, ``30s``, ``15m``, ``1h``, ``1d`` or a bare number of seconds) validate to ``float``
seconds and sizes (``512b``, ``64kb``, ``1mb``) to ``int`` bytes. Error messages say what was
expected, in the words of CONFIG.md; :mod:`gateway.config` adds the file and the key path.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationInfo, WithJsonSchema
from pydantic_core import PydanticCustomError

DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)(b|kb|mb|gb)?$", re.IGNORECASE)

# A `${VAR}` reference is accepted by the schema wherever a typed value may stand: it is
# replaced from the environment before validation (gateway.config.interpolate).
ENV_REFERENCE_SCHEMA = {"type": "string", "pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$"}


# RFC 9110 §5.6.2 tokens (header names, methods, directive names) and §5.5 field values
# (visible ASCII, space and tab: no CR, LF or other controls).
TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
FIELD_VALUE = re.compile(r"^[\x20-\x7e\t]*$")


def did_you_mean(word: Any, choices: Any) -> str:
    """'; did you mean 'x'?' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(word), sorted(str(c) for c in choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def header_name(value: Any) -> str:
    """A header field name (a token), else a config error saying so."""
    if not isinstance(value, str) or not TOKEN.match(value):
        raise PydanticCustomError("header", "expected a header name such as 'X-Frame-Options', got {got}", {"got": repr(value)})
    return value


def _config_file(value: Path, info: ValidationInfo) -> Path:
    """A file named relative to the config file's folder (CONFIG.md), which must exist."""
    path = Path((info.context or {}).get("base_dir") or Path.cwd()) / value
    if not path.is_file():
        raise PydanticCustomError("file", "cannot read {path}: no such file", {"path": str(path)})
    return path


ConfigFile = Annotated[Path, AfterValidator(_config_file)]


class Settings(BaseModel):
    """Base of every config block: immutable, and strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


def _expected(kind: str, example: str, value: Any) -> PydanticCustomError:
    return PydanticCustomError(kind, "expected {expected}, got {got}", {"expected": example, "got": repr(value)})


def parse_duration(value: Any) -> float:
    """``'250ms'`` → 0.25; a bare number is seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match:
            return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]
    raise _expected("duration", "a duration such as '250ms', '30s', '15m', '1h', '1d' or a number of seconds", value)


def parse_size(value: Any) -> int:
    """``'64kb'`` → 65536; a bare number is bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value.strip())
        if match:
            return int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "b").lower()])
    raise _expected("size", "a size such as '512b', '64kb' or '1mb'", value)


def parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR (``10.0.0.0/8``) or a single address (``127.0.0.1``)."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            pass
    raise _expected("network", "an IP address or CIDR such as '10.0.0.0/8'", value)


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h|d)?$"},
                ENV_REFERENCE_SCHEMA,
            ],
            "description": "a duration: 250ms, 30s, 15m, 1h, 1d or a number of seconds",
        }
    ),
]

Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\d+(\.\d+)?([bB]|[kKmMgG][bB])?$"},
                ENV_REFERENCE_SCHEMA,
            ],
            "description": "a size: 512b, 64kb, 1mb or a number of bytes",
        }
    ),
]

Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(parse_network),
    WithJsonSchema({"type": "string", "description": "an IP address or CIDR such as 10.0.0.0/8"}),
]
