"""The messages of protocol version 1 every agent speaks (hello, ping, sync) and the reading of
answers; exec.py and files.py hold the messages of the "exec" and "files" capabilities."""

from __future__ import annotations

from dataclasses import dataclass

from hatchvm.agent.errors import AgentRefused, ProtocolError
from hatchvm.agent.protocol import (
    REPLY,
    VERSION,
    ErrorCode,
    Fields,
    Frame,
    MsgType,
    Tag,
    int_field,
    text_field,
)

ENTROPY_BYTES = 64  # what hatchd sends per sync (the agent takes 16-512)


@dataclass(frozen=True)
class Hello:
    version: int
    agent: str
    capabilities: frozenset[str]


def hello_request(host: str) -> tuple[MsgType, Fields]:
    return MsgType.HELLO, (int_field(Tag.VERSION, VERSION), text_field(Tag.AGENT, host))


def ping_request(data: bytes) -> tuple[MsgType, Fields]:
    return MsgType.PING, ((Tag.DATA, data),)


def sync_request(time_ns: int, entropy: bytes) -> tuple[MsgType, Fields]:
    return MsgType.SYNC, (int_field(Tag.TIME_NS, time_ns), (Tag.ENTROPY, entropy))


def check_reply(request: int, frame: Frame) -> Frame:
    """The frame, if it is the answer to that request type; AgentRefused for an ERROR frame,
    ProtocolError for anything else."""
    if frame.type == MsgType.ERROR:
        code = frame.get_int(Tag.CODE) or 0
        message = frame.get_text(Tag.MESSAGE) or "no message"
        try:
            name = ErrorCode(code).name
        except ValueError:  # a code from a later version
            name = str(code)
        field = frame.get_text(Tag.NAME)
        raise AgentRefused(
            code,
            f"the guest agent refused ({name}): {message[:300]}",
            errno=frame.get_int(Tag.ERRNO),
            field=field[:40] if field else None,
            detail=message[:300],
        )
    if frame.type != request | REPLY:
        raise ProtocolError(f"answer of type {frame.type:#04x} to a {request:#04x} request")
    return frame


def parse_hello(frame: Frame) -> Hello:
    frame = check_reply(MsgType.HELLO, frame)
    version = frame.get_int(Tag.VERSION)
    if version is None:
        raise ProtocolError("hello answer without a version")
    caps = frozenset(c.decode("utf-8", errors="replace")[:64] for c in frame.get_all(Tag.CAP))
    agent = (frame.get_text(Tag.AGENT) or "unknown")[:100]
    return Hello(version=version, agent=agent, capabilities=caps)


def parse_ping(frame: Frame) -> bytes:
    return check_reply(MsgType.PING, frame).get(Tag.DATA) or b""


def parse_sync(frame: Frame) -> int:
    """The guest's CLOCK_REALTIME (ns) right after it was set."""
    guest_ns = check_reply(MsgType.SYNC, frame).get_int(Tag.TIME_NS)
    if guest_ns is None:
        raise ProtocolError("sync answer without the guest's time")
    return guest_ns
