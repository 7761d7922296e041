"""The coordinator's log as people read it (text, the default) or as machines do (one JSON object a line).

Every round event is logged once, by the coordinator, with a readable message and, in ``extra``, an event
name and its figures (``RoundEvent.log_extra``): the text format prints the message as it always has, the
JSON format prints ``{"ts", "level", "logger", "event", "message", ...figures}``. Lines without an event
name (start, shutdown, warnings) are ``"event": "log"``. Refusals are counted, not logged one by one (a
flood of bad clients must not flood the log): `RefusalTally` logs how many of each reason there were since
its last line, at most every ``every_s`` seconds and only when there were some.

Never in a line: a secret, a token or a raw client id. The coordinator logs pseudonymous keys at most
(none of its lines carries one today), and as a second guard both formats mask anything shaped like a
client token (``frc_<id>_<secret>``) or a bearer header.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from fedrecon.server.live_view import LiveView

_TOKEN = re.compile(r"\b(frc_\d+_)[A-Za-z0-9_\-]{8,}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
_RESERVED = frozenset({"ts", "level", "logger", "event", "message", "exception"})
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
TEXT_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


def redact(text: str) -> str:
    """``text`` with anything shaped like a client token or a bearer credential masked."""
    return _BEARER.sub(r"\1[redacted]", _TOKEN.sub(r"\1[redacted]", text))


class TextFormatter(logging.Formatter):
    """The readable format: time, level, message (the figures are in the message already)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, TEXT_DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``event``, ``message``,
    then the event's figures (non-finite numbers become null: JSON has no NaN) and ``exception`` when
    there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": str(getattr(record, "event", "log")),
            "message": redact(record.getMessage()),
        }
        figures = getattr(record, "figures", None)
        if isinstance(figures, Mapping):
            line.update({k: _json_ready(v) for k, v in figures.items() if k not in _RESERVED})
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"), default=str)


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def formatter(kind: LogFormat) -> logging.Formatter:
    return JsonFormatter() if kind == LogFormat.JSON else TextFormatter()


class RefusalTally:
    """Logs the refusals counted since its last line, by reason (``view().refusals`` are totals since the
    process started), at most every ``every_s`` seconds; ``maybe_log`` is called often (the server's
    progress timer) and does nothing between lines or when nothing was refused."""

    def __init__(self, view: Callable[[], LiveView], *, every_s: float = 60.0,
                 logger: logging.Logger | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._view = view
        self.every_s = every_s
        self._log = logger or logging.getLogger("fedrecon.server.coordinator")
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, int] = dict(view().refusals)
        self._since = clock()

    def maybe_log(self, *, force: bool = False) -> dict[str, int]:
        """The counts logged (empty if no line was due or nothing was refused since the last)."""
        with self._lock:
            now = self._clock()
            if not force and now - self._since < self.every_s:
                return {}
            totals = dict(self._view().refusals)
            counts = {k: n - self._last.get(k, 0) for k, n in sorted(totals.items())
                      if n > self._last.get(k, 0)}
            window = now - self._since
            self._last, self._since = totals, now
        if counts:
            figures = {"window_s": round(window, 3), "counts": counts, "total": sum(counts.values())}
            self._log.info("refusals in the last %.0f s: %s", window,
                           ", ".join(f"{k} {n}" for k, n in counts.items()),
                           extra={"event": "refusals", "figures": figures})
        return counts
