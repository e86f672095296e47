"""Structured events as JSON lines (opt-in): membership changes and collective outcomes,
for the stress harness and for debugging. Readers parse records, never log text."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, TextIO


class EventLog:
    """Appends one JSON object per event to `path` (no-op when path is None).

    Each record has "ts" (unix seconds), "source", "pid" and "event" (its type), plus
    the event's fields.
    Thread-safe; several processes may append to one file (each line is one write).
    """

    def __init__(self, path: str | None, source: str) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        if path:
            self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in close()

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def emit(self, event: str, /, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"ts": time.time(), "source": self._source, "pid": os.getpid(), "event": event}
        record.update(fields)
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
