"""Random identifiers: request ids, trace ids and span ids, from os.urandom read 4 KiB at a time.

A request id and a new traceparent took three getrandom() calls per request; reading ahead makes
that one call per about a hundred requests. A forked worker drops what it inherited, so no two
processes hand out the same ids.
"""

from __future__ import annotations

import os

BLOCK = 4096
_buffer = b""
_offset = 0


def random_hex(size: int) -> str:
    """``size`` random bytes as lowercase hex."""
    global _buffer, _offset  # one read-ahead buffer per process, like os.urandom's own state
    if _offset + size > len(_buffer):
        _buffer, _offset = os.urandom(BLOCK), 0
    start = _offset
    _offset = start + size
    return _buffer[start : start + size].hex()


def new_request_id() -> str:
    return random_hex(16)


def _forget() -> None:
    global _buffer, _offset
    _buffer, _offset = b"", 0


os.register_at_fork(after_in_child=_forget)
