"""/metrics on an address of its own (HATCH_METRICS_ADDR): a second uvicorn server on hatchd's
loop, so a scrape reads the proxy's counters on the thread that writes them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The API's server owns SIGTERM and SIGINT; hatchd stops this one when that one ends.
        yield


class MetricsListener:
    def __init__(
        self, app: FastAPI, host: str, port: int, http: type[asyncio.Protocol] | str = "auto"
    ) -> None:
        """http: uvicorn's HTTP protocol (hatchd's: the API's connection guard)."""
        self._host, self._port = host, port
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", http=http, ws="none"
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen (OSError: the address is unusable), then serve in the background."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.create_server((self._host, self._port), family=family)
        sock.setblocking(False)
        self._task = asyncio.create_task(self._server.serve([sock]), name="metrics-listener")

    async def close(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
