"""Every VM's agent channel, and what hatchd asks of agents.

A VM's channel is replaced whenever its VMM process starts, is restored or is found at start-up
(the port's socket is new each time). After a restore the guest's wall clock is wherever it was
when the snapshot froze it and its RNG state is shared with every other guest restored from
the same memory: `after_resume` sends the host's time and fresh random bytes and waits for the
agent's answer, bounded by HATCH_AGENT_TIMEOUT. An image without an agent still restores; the
caller gets a warning to put in the VM's state_reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from hatchvm import __version__
from hatchvm.agent.channel import AgentChannel
from hatchvm.agent.errors import AgentError, AgentUnavailable
from hatchvm.agent.messages import (
    ENTROPY_BYTES,
    Hello,
    hello_request,
    parse_hello,
    parse_sync,
    sync_request,
)
from hatchvm.agent.protocol import REPLY, Frame, MsgType
from hatchvm.metrics import Metrics

log = structlog.get_logger("hatchvm.agent")

# How long a freshly booted guest gets to start its agent and say hello. Nobody waits on it:
# the hello only tells the log (and later callers) which agent runs.
HELLO_TIMEOUT = 120.0
HOST = f"hatchd {__version__}"


@dataclass(frozen=True)
class SyncResult:
    host_sent_ns: int  # the time hatchd sent
    guest_ns: int  # the guest's clock right after setting it
    host_received_ns: int  # when hatchd had the answer

    @property
    def offset_s(self) -> float:
        """Guest minus host at the moment the guest answered (estimated mid-round-trip)."""
        return (self.guest_ns - (self.host_sent_ns + self.host_received_ns) / 2) / 1e9

    @property
    def round_trip_s(self) -> float:
        return (self.host_received_ns - self.host_sent_ns) / 1e9


class Agents:
    def __init__(self, timeout: float, metrics: Metrics | None = None) -> None:
        self.timeout = timeout
        self.metrics = metrics or Metrics()
        self._channels: dict[str, AgentChannel] = {}
        self.hellos: dict[str, Hello] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._resyncing: set[str] = set()

    async def attach(self, vm_id: str, socket: Path | None, *, restored: bool = False) -> None:
        """The VM's VMM (re)started with its agent port at socket: connect to it (the guest
        may be paused), and say hello in the background. A guest that did not just wake from
        a snapshot is synced in the background too (its RTC gives whole seconds only)."""
        self.detach(vm_id)
        if socket is None:
            return
        channel = AgentChannel(vm_id, socket, lambda frame: self._unsolicited(vm_id, frame))
        self._channels[vm_id] = channel
        try:
            await channel.connect()
        except AgentUnavailable as exc:
            log.warning("guest agent port not reachable", vm_id=vm_id, reason=str(exc))
            return
        self._spawn(self._greet(vm_id, channel, sync=not restored))

    def detach(self, vm_id: str) -> None:
        channel = self._channels.pop(vm_id, None)
        self.hellos.pop(vm_id, None)
        if channel is not None:
            channel.close()

    def channel(self, vm_id: str) -> AgentChannel:
        channel = self._channels.get(vm_id)
        if channel is None:
            raise AgentUnavailable("the VM has no guest agent port (its VMM does not run)")
        return channel

    async def hello(self, vm_id: str, timeout: float | None = None) -> Hello:
        channel = self.channel(vm_id)
        frame = await channel.request(*hello_request(HOST), timeout or self.timeout)
        hello = parse_hello(frame)
        if self._channels.get(vm_id) is channel:
            self.hellos[vm_id] = hello
        return hello

    async def ready(self, vm_id: str, timeout: float) -> tuple[AgentChannel, Hello]:
        """The VM's channel and what its agent can do, once it has said hello: at once if it
        did, else waiting for it (a guest just booted or woken) up to timeout."""
        channel = self.channel(vm_id)
        hello = self.hellos.get(vm_id)
        if hello is None:
            hello = await self.hello(vm_id, timeout)
        return channel, hello

    async def sync(self, vm_id: str, timeout: float | None = None) -> SyncResult:
        """Set the guest's wall clock to the host's and reseed its RNG; wait for the answer."""
        channel = self.channel(vm_id)
        sent = time.time_ns()
        fields = sync_request(sent, secrets.token_bytes(ENTROPY_BYTES))
        frame = await channel.request(*fields, timeout or self.timeout)
        return SyncResult(sent, parse_sync(frame), time.time_ns())

    async def after_resume(self, vm_id: str) -> str | None:
        """Sync a guest that just woke from a snapshot. None when done; otherwise a warning
        for the VM's state_reason (the VM runs either way)."""
        try:
            result = await self.sync(vm_id)
        except AgentError as exc:
            self.metrics.agent_synced(False)
            log.warning("guest clock and rng not synced after a restore", vm_id=vm_id, why=str(exc))
            return f"clock not synced, RNG not reseeded: {exc}"
        except Exception as exc:  # a bug here must not cost the guest its restore
            self.metrics.agent_synced(False)
            log.exception("guest resync failed unexpectedly", vm_id=vm_id)
            return f"clock not synced, RNG not reseeded: internal error ({type(exc).__name__})"
        self.metrics.agent_synced(True)
        log.info(
            "guest clock and rng synced",
            vm_id=vm_id,
            offset_ms=round(result.offset_s * 1000, 2),
            round_trip_ms=round(result.round_trip_s * 1000, 2),
        )
        return None

    async def _greet(self, vm_id: str, channel: AgentChannel, sync: bool) -> None:
        started = time.monotonic()
        try:
            hello = await self.hello(vm_id, HELLO_TIMEOUT)
        except AgentError as exc:
            log.info("no guest agent answered", vm_id=vm_id, reason=str(exc))
            return
        log.info(
            "guest agent ready",
            vm_id=vm_id,
            agent=hello.agent,
            version=hello.version,
            capabilities=sorted(hello.capabilities),
            after_s=round(time.monotonic() - started, 3),
        )
        if sync and "sync" in hello.capabilities and self._channels.get(vm_id) is channel:
            with contextlib.suppress(AgentError):
                await self.sync(vm_id)

    def _unsolicited(self, vm_id: str, frame: Frame) -> None:
        """A frame nobody waits for. A hello is an agent that (re)started (id 0) or answered
        late: what it can do is noted. A sync answered late (its agent was stuck, or hatchd
        gave up) has just set the guest's clock to a time long past: sync again, now."""
        if frame.type == MsgType.HELLO | REPLY:
            try:
                self.hellos[vm_id] = parse_hello(frame)
            except AgentError:
                log.debug("an unusable hello from a guest agent", vm_id=vm_id)
        elif frame.type == MsgType.SYNC | REPLY and vm_id not in self._resyncing:
            log.warning("a late sync reached the guest; syncing again", vm_id=vm_id)
            self._resyncing.add(vm_id)
            self._spawn(self._resync(vm_id))
        else:
            log.debug("unsolicited frame from a guest agent", vm_id=vm_id, type=frame.type)

    async def _resync(self, vm_id: str) -> None:
        try:
            await self.sync(vm_id)
        except AgentError as exc:
            log.warning("guest resync failed", vm_id=vm_id, reason=str(exc))
        finally:
            self._resyncing.discard(vm_id)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for vm_id in list(self._channels):
            self.detach(vm_id)
