"""Crash points: named step boundaries where hatchd can be made to die on purpose (SIGKILL, no
clean-up), so a test can prove that a daemon killed anywhere loses nothing and leaves nothing
behind. Inert unless the environment variable HATCH_CRASH_AT names a point (tests only)."""

from __future__ import annotations

import os
import signal

import structlog

log = structlog.get_logger("hatchvm.crashpoints")

_WANTED = os.environ.get("HATCH_CRASH_AT", "")


def crashpoint(name: str) -> None:
    if name == _WANTED:
        log.warning("crash point reached: killing hatchd", point=name)
        os.kill(os.getpid(), signal.SIGKILL)
