"""Reaching into a user's VM through its guest agent: the checks every exec, process and file
call goes through, and what the agent's failures mean as answers.

A call names the caller's VM (another user's is 404, like everywhere). A VMM driver without an
agent channel (Firecracker, for now) is a 501 at once, like its other missing features; an
image whose manifest
says it has no agent is a 409 at once; a sleeping VM (stopped, snapshotted) is woken first
through the same shared wake as the proxy; then the call waits for the agent to have said hello
(a guest just booted or woken), up to HATCH_AGENT_READY_TIMEOUT (503 after), and a hello
without the capability is a 409. While a call runs, the VM counts as in use for the idle
reaper.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import structlog

from hatchvm.agent.channel import AgentChannel
from hatchvm.agent.errors import (
    AgentError,
    AgentRefused,
    AgentTimeout,
    AgentUnavailable,
    ProtocolError,
)
from hatchvm.agent.protocol import ErrorCode
from hatchvm.config import Settings
from hatchvm.core.activity import Activity
from hatchvm.core.vms import VMService
from hatchvm.core.wake import WakeService
from hatchvm.db.models import VM
from hatchvm.errors import (
    BackendUnavailable,
    BadGateway,
    BadRequest,
    Conflict,
    GatewayTimeout,
    HatchError,
    NotFound,
)
from hatchvm.images.builder import UNKNOWN_AGENT
from hatchvm.vmm.base import Feature

log = structlog.get_logger("hatchvm.core")

STALL_S = 30.0  # how long the agent may take to answer, or to send the next part of one


class GuestService:
    def __init__(
        self, settings: Settings, vms: VMService, wake: WakeService, activity: Activity
    ) -> None:
        self._s = settings
        self.vms = vms
        self.wake = wake
        self.activity = activity
        self._image_agents: dict[tuple[str, str | None], str | None] = {}

    @asynccontextmanager
    async def agent(self, user_id: str, vm_id: str, capability: str) -> AsyncIterator[AgentChannel]:
        """The VM's agent channel, ready for a call needing capability; the VM is in use
        meanwhile, and the agent's failures come out as HatchErrors."""
        vm = await self.vms.get(user_id, vm_id)
        await self.vms.require(Feature.AGENT, vm.id)
        await self.check_agent_image(vm, capability)
        vm = await self.wake.ensure_running(vm)
        with self.activity.connection(vm.id), translated(vm.id):
            channel = await self._ready(vm, capability)
            yield channel

    async def check_agent_image(self, vm: VM, capability: str) -> None:
        """409 when the VM's image says it has no agent."""
        key = (vm.image_id, vm.image_version)
        if key not in self._image_agents:
            try:
                self._image_agents[key] = (await self.vms.image_files(vm)).agent
            except HatchError:
                self._image_agents[key] = UNKNOWN_AGENT  # its files are gone: let it answer
        if self._image_agents[key] is None:
            raise Conflict(
                f"vm {vm.id} has no guest agent (its image {vm.image_id} was built without "
                f"one): {capability} needs it"
            )

    async def _ready(self, vm: VM, capability: str) -> AgentChannel:
        timeout = self._s.agent_ready_timeout
        try:
            channel, hello = await self.vms.agents.ready(vm.id, timeout)
        except AgentTimeout:
            raise BackendUnavailable(
                f"the guest agent of vm {vm.id} did not answer in {timeout:g} s "
                "(HATCH_AGENT_READY_TIMEOUT)"
            ) from None
        if capability not in hello.capabilities:
            raise Conflict(
                f"the guest agent of vm {vm.id} ({hello.agent}) cannot {capability}: "
                "its image was built by an older hatchvm"
            )
        return channel

    @contextmanager
    def using(self, vm_id: str) -> Iterator[None]:
        """For work that goes on after agent() was left (a streamed answer): the VM stays
        in use, and failures are translated."""
        with self.activity.connection(vm_id), translated(vm_id):
            yield


@contextmanager
def translated(vm_id: str) -> Iterator[None]:
    """The agent's failures as answers: what it refused by why (a missing file is 404, a
    bad command 400, most else 409), gone or busy 503, stalled midway 504, nonsense 502."""
    try:
        yield
    except AgentRefused as exc:
        raise refusal(exc) from None
    except AgentTimeout as exc:
        raise GatewayTimeout(f"vm {vm_id}: {exc}") from None
    except ProtocolError as exc:
        raise BadGateway(f"vm {vm_id}: {exc}") from None
    except AgentUnavailable as exc:
        raise BackendUnavailable(f"vm {vm_id}: {exc}") from None
    except AgentError as exc:  # too many requests in flight
        raise BackendUnavailable(f"vm {vm_id}: {exc}") from None


def refusal(exc: AgentRefused) -> HatchError:
    """What an ERROR from the agent means for the caller."""
    detail = exc.detail
    if exc.code == ErrorCode.NO_SUCH:
        return NotFound(detail)
    if exc.code == ErrorCode.BUSY:
        return BackendUnavailable(f"the guest agent is busy: {detail}")
    if exc.field is not None:
        return BadRequest(f"{exc.field}: {detail}")
    if exc.code == ErrorCode.BAD_FIELD:
        return BadRequest(detail)
    if exc.code != ErrorCode.FAILED:  # what hatchd sent is what the agent said it takes
        return BadGateway(str(exc))
    if exc.errno == errno.ENOENT:
        return NotFound(detail)
    if exc.errno in (errno.EINVAL, errno.ENAMETOOLONG):
        return BadRequest(f"path: {detail}")
    return Conflict(detail)
