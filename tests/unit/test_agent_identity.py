"""set_identity against fake agents on a Unix socket: an agent 5 answers when the network and
SSH are the child's own and again when its files are written; older agents answer once. And
ForkService._watch_files: what becomes of files that could not be written."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

from hatchvm.agent.channel import AgentChannel
from hatchvm.agent.errors import AgentRefused, AgentUnavailable
from hatchvm.agent.identity import Address, identity_fields, set_identity
from hatchvm.agent.protocol import (
    REPLY,
    ErrorCode,
    Frame,
    MsgType,
    Tag,
    encode,
    int_field,
    read_frame,
    text_field,
)
from hatchvm.core.forks import ForkService
from hatchvm.errors import NotFound
from tests.unit.test_agent_channel import fake_agent

ADDRESS = Address("02:00:00:00:00:07", "10.0.0.7/24", "10.0.0.1", gateway_mac="02:00:0a:00:00:01")
IDENTITY_REPLY = MsgType.IDENTITY | REPLY


def refusal(request_id: int) -> Frame:
    fields = (
        int_field(Tag.CODE, ErrorCode.FAILED),
        int_field(Tag.ERRNO, errno.ENOSPC),
        text_field(Tag.MESSAGE, "/etc/hostname: No space left on device"),
    )
    return Frame(MsgType.ERROR, request_id, fields)


async def test_an_agent_5_answers_first_when_the_network_is_its_own(tmp_path: Path) -> None:
    requests: list[Frame] = []
    files_may_end = asyncio.Event()

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_frame(reader)
        requests.append(request)
        writer.write(encode(Frame(IDENTITY_REPLY, request.id, flags=0)))
        await files_may_end.wait()
        writer.write(encode(Frame(IDENTITY_REPLY, request.id)))
        await reader.read()  # until hatchd goes (a CREDIT may come meanwhile)

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, agent):
        channel = AgentChannel("vm_t", sock)
        files = await set_identity(channel, "vm-t", "ab" * 16, ADDRESS, timeout=5)
        assert files is not None
        await asyncio.sleep(0.05)
        assert not files.done()  # the files are still being written
        files_may_end.set()
        await asyncio.wait_for(files, 5)
        channel.close()
    [request] = requests
    assert request.get_int(Tag.WINDOW) == 1  # what says hatchd takes the early answer
    assert request.get_text(Tag.ADDR) == "10.0.0.7/24"
    assert request.get_text(Tag.GATEWAY_MAC) == "02:00:0a:00:00:01"


def test_the_gateway_mac_is_sent_only_when_known() -> None:
    without = Address("02:00:00:00:00:07", "10.0.0.7/24", "10.0.0.1")
    tags = [tag for tag, _ in identity_fields("vm-t", "ab" * 16, without)]
    assert Tag.GATEWAY_MAC not in tags and Tag.GATEWAY in tags


async def test_an_older_agent_answers_once_and_nothing_is_left_pending(tmp_path: Path) -> None:
    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_frame(reader)
        writer.write(encode(Frame(IDENTITY_REPLY, request.id)))
        await reader.read()

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, agent):
        channel = AgentChannel("vm_t", sock)
        assert await set_identity(channel, "vm-t", "ab" * 16, None, timeout=5) is None
        channel.close()


async def test_files_that_could_not_be_written_fail_the_task(tmp_path: Path) -> None:
    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_frame(reader)
        writer.write(encode(Frame(IDENTITY_REPLY, request.id, flags=0)))
        writer.write(encode(refusal(request.id)))
        await reader.read()

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, agent):
        channel = AgentChannel("vm_t", sock)
        files = await set_identity(channel, "vm-t", "ab" * 16, ADDRESS, timeout=5)
        assert files is not None
        with pytest.raises(AgentRefused) as err:
            await asyncio.wait_for(files, 5)
        assert err.value.errno == errno.ENOSPC and "/etc/hostname" in str(err.value)
        channel.close()


async def test_a_step_before_the_first_answer_fails_the_call(tmp_path: Path) -> None:
    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_frame(reader)
        writer.write(encode(refusal(request.id)))
        await reader.read()

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, agent):
        channel = AgentChannel("vm_t", sock)
        with pytest.raises(AgentRefused):
            await set_identity(channel, "vm-t", "ab" * 16, ADDRESS, timeout=5)
        channel.close()


class FakeVMs:
    def __init__(self, gone: bool) -> None:
        self.gone = gone
        self.updates: list[dict[str, Any]] = []

    async def update(self, vm_id: str, **fields: Any) -> None:
        if self.gone:
            raise NotFound(f"vm {vm_id} not found")
        self.updates.append(fields)


def watcher(vms: FakeVMs) -> ForkService:
    service = ForkService.__new__(ForkService)
    service.vms = vms  # type: ignore[assignment]
    service._watching = set()
    return service


async def test_files_not_written_show_in_the_childs_state_reason() -> None:
    async def failed() -> None:
        raise AgentRefused(ErrorCode.FAILED, "/etc/machine-id: Read-only file system")

    vms = FakeVMs(gone=False)
    service = watcher(vms)
    service._watch_files("vm_child", asyncio.create_task(failed()))
    await asyncio.gather(*service._watching)
    [update] = vms.updates
    assert "/etc/machine-id: Read-only file system" in update["state_reason"]
    assert not service._watching


async def test_a_child_deleted_meanwhile_is_left_alone() -> None:
    async def gone() -> None:
        raise AgentUnavailable("the guest agent went away")

    async def written() -> None:
        return None

    vms = FakeVMs(gone=True)
    service = watcher(vms)
    service._watch_files("vm_child", asyncio.create_task(gone()))
    service._watch_files("vm_other", asyncio.create_task(written()))
    await asyncio.gather(*service._watching)  # neither raises
    assert vms.updates == [] and not service._watching
