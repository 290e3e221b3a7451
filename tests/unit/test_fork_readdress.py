"""A fork's child is made its own by one "identity" message to its agent, sent with no hello
first (it may go while the guest is still paused); an agent that does not know the message
(an image built before it) answers UNSUPPORTED, and the same is then done by a shell script.
The agent channel and the exec are fakes: this is ForkService._readdress alone."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from hatchvm.agent.messages import Hello, check_reply
from hatchvm.agent.protocol import (
    REPLY,
    ErrorCode,
    Fields,
    Frame,
    MsgType,
    Tag,
    int_field,
    text_field,
)
from hatchvm.core import forks
from hatchvm.core.forks import READDRESS, ForkService
from hatchvm.errors import InternalError


class FakeChannel:
    """Answers IDENTITY with a reply, or with the ERROR an agent gives."""

    def __init__(self, error: ErrorCode | None) -> None:
        self.error = error
        self.sent: list[int] = []

    async def request(self, kind: int, fields: Fields, timeout: float) -> Frame:
        self.sent.append(kind)
        if self.error is None:
            return Frame(kind | REPLY, 1)
        return Frame(
            MsgType.ERROR,
            1,
            (int_field(Tag.CODE, self.error), text_field(Tag.MESSAGE, "no way")),
        )


class FakeAgents:
    def __init__(self, channel: FakeChannel) -> None:
        self._channel = channel
        self.readied = 0

    def channel(self, vm_id: str) -> FakeChannel:
        return self._channel

    async def ready(self, vm_id: str, timeout: float) -> tuple[FakeChannel, Hello]:
        self.readied += 1
        return self._channel, Hello(version=1, agent="hatch-agent 2", capabilities=frozenset())


class FakeExecution:
    """Records the command; the script exits 0."""

    commands: ClassVar[list[Any]] = []

    @classmethod
    async def start(cls, channel: object, command: Any, **_: object) -> FakeExecution:
        cls.commands.append(command)
        return cls()

    async def collect(self, limit: int) -> Any:
        return SimpleNamespace(exit=SimpleNamespace(exit_code=0), stderr=b"")


def service(channel: FakeChannel) -> tuple[ForkService, FakeAgents]:
    agents = FakeAgents(channel)
    forks_service = ForkService.__new__(ForkService)
    forks_service.vms = SimpleNamespace(agents=agents, net=None)  # type: ignore[assignment]
    return forks_service, agents


CHILD: Any = SimpleNamespace(id="vm_child", guest_ip=None, guest_mac=None)


async def one_part_identity(
    channel: FakeChannel, name: str, machine_id: str, address: object, timeout: float
) -> None:
    """set_identity as an agent that answers once (set_identity itself: test_agent_identity)."""
    check_reply(MsgType.IDENTITY, await channel.request(MsgType.IDENTITY, (), timeout))


@pytest.fixture(autouse=True)
def fake_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeExecution.commands = []
    monkeypatch.setattr(forks, "Execution", FakeExecution)
    monkeypatch.setattr(forks, "set_identity", one_part_identity)


async def test_an_agent_that_knows_identity_gets_it_with_no_hello_first() -> None:
    channel = FakeChannel(error=None)
    fork_service, agents = service(channel)
    await fork_service._readdress(CHILD)
    assert channel.sent == [MsgType.IDENTITY]
    assert agents.readied == 0 and FakeExecution.commands == []


async def test_an_agent_without_identity_is_re_made_by_the_script() -> None:
    channel = FakeChannel(error=ErrorCode.UNSUPPORTED)
    fork_service, agents = service(channel)
    await fork_service._readdress(CHILD)
    assert channel.sent == [MsgType.IDENTITY]
    assert agents.readied == 1
    [command] = FakeExecution.commands
    assert command.argv == ("/bin/sh", "-c", READDRESS)
    assert dict(command.env)["NAME"] == "vm-child"


async def test_an_identity_the_agent_failed_is_never_retried_by_the_script() -> None:
    channel = FakeChannel(error=ErrorCode.FAILED)
    fork_service, agents = service(channel)
    with pytest.raises(InternalError) as err:
        await fork_service._readdress(CHILD)
    assert "could not be re-addressed" in err.value.message
    assert agents.readied == 0 and FakeExecution.commands == []
