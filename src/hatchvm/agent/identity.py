"""A fork's child made its own by its agent (capability "identity"), in one request: hostname,
machine id, and for a networked VM its MAC, address, default route and (agent 6) the gateway's
neighbour entry; the agent also removes the SSH host keys and restarts dropbear, which makes
new ones at its next connection.

The answer comes in two parts from agent 5 on (the request carries WINDOW 1 to say hatchd takes
them): a first frame once the hostname, the network and SSH are the child's own, so its NIC
may be plugged in, and the END once /etc/hostname, /etc/hosts and /etc/machine-id are written
too. An older agent answers once, at the end."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hatchvm.agent.channel import AgentChannel
from hatchvm.agent.errors import ProtocolError
from hatchvm.agent.messages import check_reply
from hatchvm.agent.protocol import Fields, MsgType, Tag, text_field


@dataclass(frozen=True)
class Address:
    mac: str  # aa:bb:cc:dd:ee:ff
    cidr: str  # a.b.c.d/n
    gateway: str
    # The bridge's MAC: the child's first answer then needs no ARP round trip (its new MAC
    # emptied its neighbour table). An agent before 6 ignores it.
    gateway_mac: str | None = None


def identity_fields(name: str, machine_id: str, address: Address | None) -> Fields:
    fields = [text_field(Tag.NAME, name), text_field(Tag.MACHINE_ID, machine_id)]
    if address is not None:
        fields += [
            text_field(Tag.MAC, address.mac),
            text_field(Tag.ADDR, address.cidr),
            text_field(Tag.GATEWAY, address.gateway),
        ]
        if address.gateway_mac is not None:
            fields.append(text_field(Tag.GATEWAY_MAC, address.gateway_mac))
    return tuple(fields)


async def set_identity(
    channel: AgentChannel, name: str, machine_id: str, address: Address | None, timeout: float
) -> asyncio.Task[None] | None:
    """Returns once nothing of the old identity can reach the network: None when everything
    is done, else the task that ends when the files are written too (it raises what the
    agent said went wrong with them). AgentRefused (with the guest's errno) when a step
    failed."""
    fields = identity_fields(name, machine_id, address)
    exchange = channel.exchange(MsgType.IDENTITY, fields, timeout, window=1)
    await exchange.start()
    try:
        check_reply(MsgType.IDENTITY, await exchange.next())
    except BaseException:
        await exchange.close()
        raise
    if exchange.ended:
        await exchange.close()
        return None

    async def files_written() -> None:
        try:
            last = check_reply(MsgType.IDENTITY, await exchange.next())
            if not last.end:
                raise ProtocolError("an identity answer of more than two frames")
        finally:
            await exchange.close()

    return asyncio.create_task(files_written(), name=f"identity-files-{channel.vm_id}")
