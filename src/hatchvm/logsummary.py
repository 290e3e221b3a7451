"""Logging what a flood repeats without flooding the log: the first event of a kind is logged
at once; repeats within the next interval are counted and logged as one summary line when it
ends (and so on, one line per interval, for as long as they keep coming)."""

from __future__ import annotations

import asyncio
from typing import Any

MAX_SOURCES = 1000  # distinct sources remembered per summary (the count stops there)


class _Window:
    __slots__ = ("fields", "repeats", "sources")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.repeats = 0
        self.fields = fields
        self.sources: set[str] = set()


class RepeatLog:
    def __init__(self, logger: Any, event: str, interval: float = 60.0) -> None:
        self._log = logger
        self._event = event
        self.interval = interval
        self._windows: dict[str, _Window] = {}

    def note(self, kind: str, source: str = "", **fields: Any) -> None:
        window = self._windows.get(kind)
        if window is None:
            self._log.warning(self._event, kind=kind, source=source or None, **fields)
            self._open(kind, fields)
            return
        window.repeats += 1
        window.fields = fields
        if source and len(window.sources) < MAX_SOURCES:
            window.sources.add(source)

    def _open(self, kind: str, fields: dict[str, Any]) -> None:
        self._windows[kind] = _Window(fields)
        asyncio.get_running_loop().call_later(self.interval, self._close, kind)

    def _close(self, kind: str) -> None:
        window = self._windows.pop(kind, None)
        if window is None or not window.repeats:
            return  # quiet again: the next one is logged at once
        self._log.warning(
            self._event,
            kind=kind,
            repeated=window.repeats,
            within_s=self.interval,
            sources=len(window.sources),
            **window.fields,
        )
        self._open(kind, window.fields)
