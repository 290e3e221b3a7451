"""Talking to one Firecracker process over its API socket (HTTP on a Unix socket, via httpx).
Every call is bounded; a refusal becomes VMMRequestFailed carrying Firecracker's
fault_message, naming the VM and the call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from hatchvm.vmm.base import VMMError, VMMRequestFailed, VMMTimeout
from hatchvm.vmm.fc_models import FaultMessage, InstanceInfo, _Request

API_TIMEOUT = 10.0  # seconds for one ordinary call
FAULT_LIMIT = 2048  # characters of a fault_message kept in an error

A = TypeVar("A", bound=BaseModel)


class FirecrackerAPI:
    """One VM's API: `async with FirecrackerAPI(socket, vm_id) as api: await api.put(...)`."""

    def __init__(self, socket: Path, vm_id: str, timeout: float = API_TIMEOUT) -> None:
        self.socket = socket
        self.vm_id = vm_id
        transport = httpx.AsyncHTTPTransport(uds=str(socket))
        # The host part is ignored on a Unix socket; Firecracker's examples use localhost.
        self._client = httpx.AsyncClient(
            transport=transport, base_url="http://localhost", timeout=timeout
        )

    async def __aenter__(self) -> FirecrackerAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def put(self, path: str, body: _Request, timeout: float | None = None) -> None:
        await self._call("PUT", path, body, timeout)

    async def patch(self, path: str, body: _Request, timeout: float | None = None) -> None:
        await self._call("PATCH", path, body, timeout)

    async def get(self, path: str, answer: type[A]) -> A:
        response = await self._call("GET", path, None, None)
        try:
            return answer.model_validate_json(response.content)
        except ValidationError as exc:
            raise VMMRequestFailed(
                f"firecracker answered GET {path} with an unexpected body: {exc.errors()[0]}",
                vm_id=self.vm_id,
                op=f"GET {path}",
            ) from None

    async def state(self) -> str:
        """The instance's state: "Not started", "Running" or "Paused"."""
        return (await self.get("/", InstanceInfo)).state

    async def _call(
        self, method: str, path: str, body: _Request | None, timeout: float | None
    ) -> httpx.Response:
        op = f"{method} {path}"
        try:
            response = await self._client.request(
                method,
                path,
                json=body.body() if body is not None else None,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TimeoutException:
            raise VMMTimeout(
                f"firecracker did not answer within {timeout or API_TIMEOUT:g}s",
                vm_id=self.vm_id,
                op=op,
            ) from None
        except httpx.TransportError as exc:
            raise VMMError(
                f"firecracker's API socket {self.socket} is unreachable: {exc}",
                vm_id=self.vm_id,
                op=op,
            ) from None
        if response.is_success:
            return response
        raise VMMRequestFailed(
            f"firecracker refused it ({response.status_code}): {_fault(response)}",
            vm_id=self.vm_id,
            op=op,
        )


def _fault(response: httpx.Response) -> str:
    try:
        fault = FaultMessage.model_validate_json(response.content).fault_message
    except ValidationError:
        fault = None
    text = fault or response.text.strip() or response.reason_phrase
    return text[:FAULT_LIMIT]


async def wait_api(socket: Path, alive: Callable[[], bool], deadline: float) -> bool:
    """Wait until the API socket answers (Firecracker creates it at start-up) while alive()
    holds, until time.monotonic() passes deadline. True once it answers."""
    delay = 0.005
    while time.monotonic() < deadline and alive():
        if socket.exists():
            transport = httpx.AsyncHTTPTransport(uds=str(socket))
            async with httpx.AsyncClient(transport=transport, timeout=1.0) as client:
                try:
                    await client.get("http://localhost/")
                    return True
                except httpx.TransportError:
                    pass
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
    return False
