"""Sending bytes to the agent for a request in progress: a command's stdin, a file's content."""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable

from hatchvm.agent.channel import Exchange
from hatchvm.agent.errors import ProtocolError
from hatchvm.agent.messages import check_reply
from hatchvm.agent.protocol import MsgType, Tag

INPUT_CHUNK = 60 << 10  # bytes per INPUT frame (a frame holds 64 KiB with its fields)


async def _pieces(chunks: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterable[bytes]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


async def send_input(
    exchange: Exchange, request: int, chunks: AsyncIterable[bytes] | Iterable[bytes]
) -> int:
    """Send every chunk as INPUT frames, the last with END; the bytes sent. The agent may
    refuse midway (a full disk): its ERROR is raised at once, rather than after the rest."""
    sent = 0
    held = b""  # at most one frame's worth is held back, so the last frame can carry END
    async for chunk in _pieces(chunks):
        data = memoryview(held + chunk if held else chunk)
        at = 0
        while len(data) - at > INPUT_CHUNK:
            await exchange.send(MsgType.INPUT, ((Tag.DATA, bytes(data[at : at + INPUT_CHUNK])),))
            at += INPUT_CHUNK
            _check(exchange, request)
        sent += at
        held = bytes(data[at:])
    await exchange.send(MsgType.INPUT, ((Tag.DATA, held),), end=True)
    return sent + len(held)


def _check(exchange: Exchange, request: int) -> None:
    frame = exchange.take_queued()
    if frame is not None:
        check_reply(request, frame)  # an ERROR: raised as AgentRefused
        raise ProtocolError("an answer while the input was still coming")
