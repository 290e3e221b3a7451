"""One short QMP conversation per operation (QEMU's QMP socket serves one client at a time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from socket import send_fds
from socket import socket as unix_socket
from typing import Any

from qemu.qmp import QMPClient, QMPError

from hatchvm.vmm.base import VMMError

QMP_TIMEOUT = 10.0
EVENT_SILENCE = 0.5  # seconds without a migration event before asking QEMU how it goes


class _Client(QMPClient):
    def send_fd(self, fd: int) -> None:
        """fd to QEMU over the QMP socket (SCM_RIGHTS), for a getfd to name. QMPClient's own
        send_fd_scm needs asyncio's socket wrapper; this works under uvloop's as well. Sent
        between commands: nothing else is being written then."""
        assert self._writer is not None
        wrapped = self._writer.transport.get_extra_info("socket")
        with unix_socket(fileno=os.dup(wrapped.fileno())) as sock:
            send_fds(sock, [b" "], [fd])


async def qmp_execute(
    socket: Path, command: str, args: dict[str, Any] | None = None, timeout: float = QMP_TIMEOUT
) -> Any:
    client = _Client(socket.parent.name)
    try:
        await asyncio.wait_for(client.connect(str(socket)), timeout)
        return await asyncio.wait_for(client.execute(command, args), timeout)
    except (QMPError, OSError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise VMMError(f"QMP {command} on {socket.parent.name} failed: {reason}") from None
    finally:
        await _disconnect(client)


@asynccontextmanager
async def qmp_session(socket: Path, timeout: float = QMP_TIMEOUT) -> AsyncIterator[QMPSession]:
    """One connection for a sequence of commands (a snapshot or restore conversation)."""
    session = await open_session(socket, timeout)
    try:
        yield session
    finally:
        await session.close()


async def open_session(
    socket: Path, timeout: float = QMP_TIMEOUT, connect_timeout: float | None = None
) -> QMPSession:
    """A connection the caller closes (QMPSession.close), for a conversation that spans
    several steps of an operation (a restore: load the state, then later let it run).
    connect_timeout (default: timeout) bounds the wait for QEMU's greeting."""
    client = _Client(socket.parent.name)
    try:
        await asyncio.wait_for(client.connect(str(socket)), connect_timeout or timeout)
    except (QMPError, OSError, TimeoutError) as exc:
        await _disconnect(client)
        reason = str(exc) or type(exc).__name__
        raise VMMError(f"QMP connect to {socket.parent.name} failed: {reason}") from None
    return QMPSession(client, socket.parent.name, timeout)


async def _disconnect(client: QMPClient) -> None:
    """A QEMU that died mid-conversation (a failed incoming migration ends it) makes disconnect
    raise EOFError: the error already raised says what happened, not that one."""
    with contextlib.suppress(QMPError, OSError, EOFError):
        await client.disconnect()


class QMPSession:
    def __init__(self, client: _Client, name: str, timeout: float) -> None:
        self._client = client
        self._name = name
        self._timeout = timeout

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await asyncio.wait_for(self._client.execute(command, args), self._timeout)
        except (QMPError, OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise VMMError(f"QMP {command} on {self._name} failed: {reason}") from None

    async def close(self) -> None:
        await _disconnect(self._client)

    async def pass_fd(self, fd: int, name: str) -> None:
        """QEMU gets its own copy of fd, known as name: a migration to or from "fd:<name>"
        then uses it (and closes it when done)."""
        try:
            self._client.send_fd(fd)
        except (QMPError, OSError) as exc:
            raise VMMError(f"passing a file to {self._name} failed: {exc}") from None
        await self.execute("getfd", {"fdname": name})

    async def migrate_incoming(self, uri: str, timeout: float) -> None:
        """Load the state from uri into a QEMU started with `-incoming defer` and migration
        events on (-global migration.x-events=on): its MIGRATION event says when it is done,
        no polling. query-migrate is asked only when no event came for a while, which also
        notices a QEMU that died without saying so."""
        with self._client.listener("MIGRATION") as events:
            await self.execute("migrate-incoming", {"uri": uri})
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), EVENT_SILENCE)
                    status = (event.get("data") or {}).get("status")
                except TimeoutError:
                    status = (await self.execute("query-migrate")).get("status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    raise VMMError(f"migration on {self._name} {status}")
                if loop.time() > deadline:
                    raise VMMError(
                        f"migration on {self._name} did not finish within {timeout:.0f}s"
                    )

    async def wait_migration(self, timeout: float) -> dict[str, Any]:
        """Poll query-migrate until the migration ends; raise unless it completed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.002
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return dict(info)
            if status in ("failed", "cancelled"):
                detail = info.get("error-desc") or status
                raise VMMError(f"migration on {self._name} {status}: {detail}")
            if loop.time() > deadline:
                raise VMMError(f"migration on {self._name} did not finish within {timeout:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
