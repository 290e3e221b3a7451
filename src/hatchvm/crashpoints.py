"""Crash points: named step boundaries where hatchd can be made to die on purpose (SIGKILL, no
clean-up), so a test can prove that a daemon killed anywhere loses nothing and leaves nothing
behind. Inert unless the environment variable HATCH_CRASH_AT names a point (tests only). Hold
points keep hatchd inside a step until a test lets it go (HATCH_HOLD_AT, HATCH_HOLD_FILE)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import structlog

log = structlog.get_logger("hatchvm.crashpoints")

_WANTED = os.environ.get("HATCH_CRASH_AT", "")


def crashpoint(name: str) -> None:
    if name == _WANTED:
        log.warning("crash point reached: killing hatchd", point=name)
        os.kill(os.getpid(), signal.SIGKILL)


_HOLD_AT = os.environ.get("HATCH_HOLD_AT", "")
_HOLD_FILE = os.environ.get("HATCH_HOLD_FILE", "")


async def holdpoint(name: str, released: Callable[[], bool] = lambda: False) -> None:
    """Hold here while the file HATCH_HOLD_FILE exists (or until released() says so), if
    HATCH_HOLD_AT names this point (tests only): a test keeps hatchd inside a step (a snapshot
    being stored) as long as it needs, then lets it go by removing the file. Inert otherwise."""
    if name != _HOLD_AT or not _HOLD_FILE:
        return
    if os.path.exists(_HOLD_FILE):
        log.warning("hold point reached: waiting", point=name)
        # A file, not an event, releases it: the test is another process.
        while os.path.exists(_HOLD_FILE) and not released():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        log.warning("hold point released", point=name)
