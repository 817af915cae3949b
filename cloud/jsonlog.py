"""Structured logs: one JSON object per line on stderr (event name + fields)."""
from __future__ import annotations

import json
import logging
import sys
import threading
import time

LOGGER_NAME = "sllm.cloud"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
                 "event": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time, so a replaced (or closed and
    replaced) stderr, as under test runners, never leaves a dead stream behind."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logging(level: str = "info", stream=None) -> logging.Logger:
    logger = get_logger()
    logger.handlers.clear()
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderrHandler()
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def log(event: str, level: int = logging.INFO, exc_info=None, **fields) -> None:
    logger = get_logger()
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)



class LogRateLimit:
    """At most one log line per `interval_s` for a noisy event (say, every rejected token): the first
    goes out at once, later ones within the interval are only counted, and the next line that goes
    out carries that count as `suppressed`. Thread-safe."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def take(self) -> int | None:
        """None: stay quiet; else log now, with this many suppressed since the last line."""
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return None
            self._next = now + self.interval_s
            n, self._suppressed = self._suppressed, 0
            return n
