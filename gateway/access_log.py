"""Logging: JSON (or text) lines on stdout, written off the event loop.

Two streams share stdout: the application log (logger "gateway" and its children, through a
QueueHandler so a slow terminal or pipe never blocks the loop) and the access log, one line per
request. The access log skips the logging module altogether: the request path only puts a tuple
on a queue, and a writer thread formats and writes the lines, gathered for up to BATCH_INTERVAL
(a line reaches stdout at most about 20 ms after its request ended).
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import Logging
    from gateway.pipeline import Exchange

ACCESS_FIELDS = (
    "time",
    "request_id",
    "client_ip",
    "method",
    "path",
    "route",
    "status",
    "upstream",
    "upstream_status",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "user",  # the authenticated subject, when an auth policy verified one
    "upstream_ms",  # until the upstream's response head (retries included)
    "trace_id",  # W3C trace id: the client's traceparent, or one the gateway started
)
BATCH_INTERVAL = 0.02  # seconds the access-log writer gathers lines before the next write
# LogRecord attributes that are not extra fields.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def _iso(timestamp: float) -> str:
    """UTC with milliseconds (``2026-11-29T14:01:38.214Z``); the date and time of day are
    formatted once per second, not per line."""
    global _second  # a one-entry memo shared by the two writer threads (a race only recomputes)
    whole = int(timestamp)
    micro = round((timestamp - whole) * 1e6)  # rounded as datetime.fromtimestamp rounds
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    second, text = _second
    if whole != second:
        text = datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (whole, text)
    return f"{text}.{micro // 1000:03d}Z"


# One encoder: json.dumps with any argument of its own builds a new JSONEncoder per call.
_JSON = json.JSONEncoder(separators=(",", ":"), default=str)


def _format(fields: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return _JSON.encode(fields)
    return " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)


class LineFormatter(logging.Formatter):
    """One line per record: time, level, logger, message, the record's extra fields, traceback."""

    def __init__(self, as_json: bool = True) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS:
                fields[key] = value
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        return _format(fields, self.as_json)


_listener: logging.handlers.QueueListener | None = None


def setup_logging(settings: "Logging", stream: IO[str] | None = None) -> None:
    """Route the "gateway" loggers to stdout through a queue; idempotent (reload calls it)."""
    global _listener  # the one process-wide log writer, like the logging module's own state
    logger = logging.getLogger("gateway")
    logger.setLevel(settings.level.upper())
    logger.propagate = False
    if _listener is not None:
        atexit.unregister(_listener.stop)  # QueueListener.stop may run only once
        _listener.stop()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    sink = logging.StreamHandler(stream or sys.stdout)
    sink.setFormatter(LineFormatter(settings.format == "json"))
    log_queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    logger.addHandler(logging.handlers.QueueHandler(log_queue))
    _listener = logging.handlers.QueueListener(log_queue, sink)
    _listener.start()
    atexit.register(_listener.stop)


class AccessLog:
    """One line per request, formatted and written by a background thread."""

    def __init__(self, enabled: bool, as_json: bool = True, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self.as_json = as_json
        self.stream = stream or sys.stdout
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._write_lines, name="access-log", daemon=True)
            self._thread.start()

    def record(self, exchange: "Exchange", status: int) -> None:
        if not self.enabled:
            return
        route = exchange.route
        self._queue.put(
            (
                time.time(),
                exchange.request_id,
                exchange.client_ip,
                exchange.method,
                exchange.path or exchange.request.raw_path,
                route.name if route is not None else None,
                status,
                exchange.target,
                exchange.upstream_status,
                round((time.perf_counter() - exchange.started) * 1000, 3),
                exchange.bytes_in,
                exchange.bytes_out,
                exchange.subject,
                exchange.upstream_ms,
                exchange.trace_id,
                exchange.notes or None,
            )
        )

    def _write_lines(self) -> None:
        while True:
            item = self._queue.get()
            lines = []
            while item is not None:
                fields = dict(zip(ACCESS_FIELDS, item))
                fields["time"] = _iso(item[0])
                if item[-1]:
                    fields.update(item[-1])
                lines.append(_format(fields, self.as_json))
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if lines:
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stdout closed: nothing sensible is left to do with the line
            if item is None:
                return
            # Lines are written in batches: under load one wake-up per interval, not one per
            # request (each wake-up cost the event loop a handoff of the GIL and futex calls).
            time.sleep(BATCH_INTERVAL)

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None
