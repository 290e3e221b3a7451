"""One short QMP conversation per operation (QEMU's QMP socket serves one client at a time)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from hatchvm.vmm.base import VMMError

QMP_TIMEOUT = 10.0


async def qmp_execute(
    socket: Path, command: str, args: dict[str, Any] | None = None, timeout: float = QMP_TIMEOUT
) -> Any:
    client = QMPClient(socket.parent.name)
    try:
        await asyncio.wait_for(client.connect(str(socket)), timeout)
        return await asyncio.wait_for(client.execute(command, args), timeout)
    except (QMPError, OSError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise VMMError(f"QMP {command} on {socket.parent.name} failed: {reason}") from None
    finally:
        await client.disconnect()
