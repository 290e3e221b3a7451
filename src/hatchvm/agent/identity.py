"""A fork's child made its own by its agent (capability "identity"), in one request: hostname,
machine id, and for a networked VM its MAC, address and default route; the agent also removes
the SSH host keys and restarts dropbear, which makes new ones at its next connection."""

from __future__ import annotations

from dataclasses import dataclass

from hatchvm.agent.channel import AgentChannel
from hatchvm.agent.messages import check_reply
from hatchvm.agent.protocol import Fields, MsgType, Tag, text_field


@dataclass(frozen=True)
class Address:
    mac: str  # aa:bb:cc:dd:ee:ff
    cidr: str  # a.b.c.d/n
    gateway: str


def identity_fields(name: str, machine_id: str, address: Address | None) -> Fields:
    fields = [text_field(Tag.NAME, name), text_field(Tag.MACHINE_ID, machine_id)]
    if address is not None:
        fields += [
            text_field(Tag.MAC, address.mac),
            text_field(Tag.ADDR, address.cidr),
            text_field(Tag.GATEWAY, address.gateway),
        ]
    return tuple(fields)


async def set_identity(
    channel: AgentChannel, name: str, machine_id: str, address: Address | None, timeout: float
) -> None:
    """AgentRefused (with the guest's errno) when a step failed."""
    fields = identity_fields(name, machine_id, address)
    check_reply(MsgType.IDENTITY, await channel.request(MsgType.IDENTITY, fields, timeout))
