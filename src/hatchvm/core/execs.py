"""Commands in a user's VM: run one (its output collected, or streamed as it comes), start one
in the background, and list, read, signal or forget background processes."""

from __future__ import annotations

from collections.abc import AsyncIterator

from hatchvm.agent import exec as agent_exec
from hatchvm.agent.exec import Command, Execution, Exit, Output, Process, Result
from hatchvm.core.guest import STALL_S, GuestService

OUTPUT_LIMIT = 1 << 20  # bytes kept per stream of a command's collected output


class ExecService:
    def __init__(self, guest: GuestService) -> None:
        self.guest = guest

    async def run(self, user_id: str, vm_id: str, command: Command) -> Result:
        """Run the command to its end (or timeout); each stream cut at OUTPUT_LIMIT."""
        async with self.guest.agent(user_id, vm_id, "exec") as channel:
            execution = await Execution.start(channel, command, limit=OUTPUT_LIMIT, timeout=STALL_S)
            return await execution.collect(OUTPUT_LIMIT)

    async def stream(
        self, user_id: str, vm_id: str, command: Command
    ) -> tuple[int, AsyncIterator[Output | Exit]]:
        """Start the command (a refusal is raised here, before any answer); its pid and its
        events as they come, uncut. Leaving the events early kills the command."""
        async with self.guest.agent(user_id, vm_id, "exec") as channel:
            execution = await Execution.start(channel, command, limit=None, timeout=STALL_S)
        return execution.pid, self._events(vm_id, execution)

    async def _events(self, vm_id: str, execution: Execution) -> AsyncIterator[Output | Exit]:
        try:
            with self.guest.using(vm_id):
                async for event in execution.events():
                    yield event
        finally:
            await execution.close()

    async def start_background(self, user_id: str, vm_id: str, command: Command) -> Process:
        async with self.guest.agent(user_id, vm_id, "exec") as channel:
            return await agent_exec.start_background(channel, command, STALL_S)

    async def processes(self, user_id: str, vm_id: str) -> list[Process]:
        async with self.guest.agent(user_id, vm_id, "exec") as channel:
            return await agent_exec.list_processes(channel, STALL_S)

    async def process(self, user_id: str, vm_id: str, pid: int) -> tuple[Process, bytes, bytes]:
        """The process and the output its agent kept (the newest 256 KiB of each stream)."""
        async with self.guest.agent(user_id, vm_id, "exec") as channel:
            return await agent_exec.read_process(channel, pid, STALL_S)

    async def signal(
        self, user_id: str, vm_id: str, pid: int, signal: int, *, forget: bool
    ) -> Process:
        async with self.guest.agent(user_id, vm_id, "exec") as channel:
            return await agent_exec.kill_process(
                channel, pid, signal, forget=forget, timeout=STALL_S
            )
