"""Bounded polling helpers: conditions with deadlines, never guessed sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # the condition may raise until it holds
            last_error = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last_error})")


def http_text(url: str, timeout: float = 2.0) -> str | None:
    response = httpx.get(url, timeout=timeout)
    return response.text if response.status_code == 200 else None


def wait_http(url: str, timeout: float = 120.0) -> str:
    return wait_for(lambda: http_text(url), timeout, f"HTTP 200 from {url}")


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll check() until it returns something true, or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
