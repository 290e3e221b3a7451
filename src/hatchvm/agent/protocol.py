"""The guest agent's wire format, protocol version 1: framing and fields.

One module on each side: this one and images/guest/agent/hatch-agent.c (docs/agent-protocol.md
describes both). A frame is a 16-byte header and a payload of fields, all big-endian:

    0  2  magic b"HV"           8  2  flags (bit 0 END: the last frame answering an id)
    2  1  version (1)           10 2  reserved, 0
    3  1  type                  12 4  payload length, at most MAX_PAYLOAD
    4  4  request id

A field is a tag (u16), a length (u32) and the value: integers are 8-byte signed, text is
UTF-8, data is raw bytes, and a record (a process, a directory entry) is fields in a field. A
tag may repeat (capabilities, argv, env); fields a reader does not know are skipped. The
header's layout never changes between versions, so any reader can step over a frame it does
not understand. Version 1 grows by capabilities: hatchd sends a message only to an agent whose
HELLO names its capability.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from hatchvm.agent.errors import ProtocolError

MAGIC = b"HV"
VERSION = 1
HEADER = struct.Struct(">2sBBIHHI")  # magic, version, type, id, flags, reserved, length
FIELD = struct.Struct(">HI")  # tag, length
MAX_PAYLOAD = 64 << 10
END = 0x0001
MAX_ID = 0xFFFFFFFF

Fields = tuple[tuple[int, bytes], ...]


class MsgType(IntEnum):
    """Requests; a reply's type is the request's with REPLY set. ERROR answers any request.
    INPUT, CREDIT and CANCEL carry the id of a request in progress and are never answered."""

    HELLO = 0x01
    PING = 0x02
    SYNC = 0x03
    INPUT = 0x04  # hatchd -> agent: the next bytes of a request's stdin or file (END: the last)
    CREDIT = 0x05  # hatchd -> agent: this many more frames of the answer may come
    CANCEL = 0x06  # hatchd -> agent: nobody waits for this answer any more
    EXEC = 0x10  # cap "exec"
    PROC_LIST = 0x11
    PROC_GET = 0x12
    PROC_KILL = 0x13
    FILE_READ = 0x20  # cap "files"
    FILE_WRITE = 0x21
    FILE_STAT = 0x22
    FILE_LIST = 0x23
    FILE_DELETE = 0x24
    IDENTITY = 0x30  # cap "identity": a fork's child gets its own name, address and keys
    ERROR = 0x7F


REPLY = 0x80


class Tag(IntEnum):
    VERSION = 1  # int: protocol version
    AGENT = 2  # text: the agent's name and build
    CAP = 3  # text, repeated: what the agent can do ("ping", "sync", ...)
    DATA = 4  # data
    TIME_NS = 5  # int: CLOCK_REALTIME in nanoseconds since the epoch
    ENTROPY = 6  # data: 16-512 random bytes from the host
    CODE = 7  # int: an ErrorCode
    MESSAGE = 8  # text: what went wrong, for people
    ARGV = 9  # text, repeated: the command
    ENV = 10  # text, repeated: NAME=value
    CWD = 11  # text
    TIMEOUT_MS = 12  # int: the command is killed (its process group) after this long
    LIMIT = 13  # int: output bytes sent per stream; past it, read and dropped
    BACKGROUND = 14  # int: 1 starts the command in the background
    STDIN = 15  # int: 1 when INPUT frames with the command's stdin follow
    WINDOW = 16  # int: frames of a streamed answer hatchd takes unasked
    CREDIT = 17  # int: frames granted by a CREDIT message
    STREAM = 18  # int: 1 stdout, 2 stderr
    EXIT_CODE = 19  # int
    SIGNAL = 20  # int: the signal that ended a process, or the one to send
    TIMED_OUT = 21  # int: 1 when the timeout killed it
    TRUNCATED = 22  # int: bit 0 stdout, bit 1 stderr went past LIMIT
    PID = 23  # int
    PROC = 24  # record: a background process
    CMD = 25  # text: its command line
    RUNNING = 26  # int: 1 while it runs
    STARTED_NS = 27  # int: CLOCK_REALTIME at its start
    ENDED_NS = 28  # int: CLOCK_REALTIME at its end
    OUT_BYTES = 29  # int: stdout bytes it wrote in all
    ERR_BYTES = 30  # int: stderr bytes it wrote in all
    PATH = 31  # text: an absolute path in the guest
    MODE = 32  # int: permission bits
    PARENTS = 33  # int: 1 creates missing parent directories
    SIZE = 34  # int: bytes
    MTIME_NS = 35  # int: modification time
    KIND = 36  # text: file, dir, symlink, other
    ENTRY = 37  # record: a directory entry (NAME, KIND, SIZE, MODE, MTIME_NS)
    NAME = 38  # text
    RECURSIVE = 39  # int: 1 deletes a directory with everything in it
    ERRNO = 40  # int: the guest's errno behind an ERROR
    FORGET = 41  # int: 1 forgets the process once signalled
    MACHINE_ID = 42  # text: /etc/machine-id
    ADDR = 43  # text: an IPv4 address and prefix length, a.b.c.d/n
    MAC = 44  # text: aa:bb:cc:dd:ee:ff
    GATEWAY = 45  # text: the default route's IPv4 gateway
    GATEWAY_MAC = 46  # text: the gateway's MAC, set as its neighbour entry (agent 6)


class ErrorCode(IntEnum):
    BAD_FRAME = 1  # the header made no sense (answered with id 0)
    UNSUPPORTED = 2  # a message type the agent does not know
    BAD_FIELD = 3  # a field missing, of the wrong size, or the fields malformed
    FAILED = 4  # the agent tried and the guest's kernel refused (MESSAGE says what, ERRNO why)
    VERSION = 5  # a protocol version the agent does not speak
    BUSY = 6  # too many requests in progress, or background processes running
    NO_SUCH = 7  # no such background process


class _FieldReader:
    """Typed reads of tagged fields, shared by frames and the records inside their fields."""

    fields: Fields

    def _where(self) -> str:
        raise NotImplementedError

    def get(self, tag: int) -> bytes | None:
        return next((value for t, value in self.fields if t == tag), None)

    def get_int(self, tag: int) -> int | None:
        value = self.get(tag)
        if value is None:
            return None
        if len(value) != 8:
            raise ProtocolError(f"field {tag} of {self._where()} is not an integer")
        return int.from_bytes(value, "big", signed=True)

    def get_text(self, tag: int) -> str | None:
        value = self.get(tag)
        return None if value is None else value.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Frame(_FieldReader):
    type: int
    id: int
    fields: Fields = ()
    flags: int = END
    version: int = VERSION

    def get_all(self, tag: int) -> list[bytes]:
        return [value for t, value in self.fields if t == tag]

    def _where(self) -> str:
        return f"a {self.type:#04x} frame"

    def records(self, tag: int) -> list[Record]:
        """The record fields with this tag, each decoded (ProtocolError if malformed)."""
        return [Record(decode_fields(value)) for value in self.get_all(tag)]

    @property
    def end(self) -> bool:
        return bool(self.flags & END)


@dataclass(frozen=True)
class Record(_FieldReader):
    """Fields inside a field: one process, one directory entry."""

    fields: Fields

    def _where(self) -> str:
        return "a record"


def int_field(tag: int, value: int) -> tuple[int, bytes]:
    return (tag, value.to_bytes(8, "big", signed=True))


def text_field(tag: int, value: str) -> tuple[int, bytes]:
    return (tag, value.encode())


def encode_fields(fields: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(FIELD.pack(tag, len(value)) + value for tag, value in fields)


def encode(frame: Frame) -> bytes:
    payload = encode_fields(frame.fields)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if not 0 <= frame.id <= MAX_ID:
        raise ValueError(f"request id {frame.id} out of range")
    header = HEADER.pack(MAGIC, frame.version, frame.type, frame.id, frame.flags, 0, len(payload))
    return header + payload


@dataclass(frozen=True)
class Header:
    version: int
    type: int
    id: int
    flags: int
    length: int


def decode_header(data: bytes) -> Header:
    """The header in data's first HEADER.size bytes; ProtocolError if it is not one."""
    magic, version, type_, id_, flags, reserved, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if reserved != 0:
        raise ProtocolError("reserved header bytes are not zero")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_PAYLOAD}-byte bound")
    return Header(version, type_, id_, flags, length)


def decode_fields(payload: bytes) -> Fields:
    fields = []
    at = 0
    while at < len(payload):
        if len(payload) - at < FIELD.size:
            raise ProtocolError("truncated field header")
        tag, length = FIELD.unpack_from(payload, at)
        at += FIELD.size
        if length > len(payload) - at:
            raise ProtocolError(f"field {tag} runs past the end of its frame")
        fields.append((tag, payload[at : at + length]))
        at += length
    return tuple(fields)


def decode(data: bytes) -> tuple[Frame, int] | None:
    """The first frame in data and the bytes it took, or None while it is incomplete."""
    if len(data) < HEADER.size:
        return None
    header = decode_header(data)
    end = HEADER.size + header.length
    if len(data) < end:
        return None
    return _frame(header, data[HEADER.size : end]), end


def _frame(header: Header, payload: bytes) -> Frame:
    # A frame of another version is still delimited (the header never changes); its
    # payload is left to whoever checks the version.
    fields = decode_fields(payload) if header.version == VERSION else ()
    return Frame(header.type, header.id, fields, header.flags, header.version)


async def read_frame(reader: asyncio.StreamReader, within: float | None = None) -> Frame:
    """The next frame; asyncio.IncompleteReadError at EOF, ProtocolError on garbage. Never
    reads more than one header and MAX_PAYLOAD bytes for it. within: once its first byte has
    come, the rest of the frame must follow in that many seconds (ProtocolError otherwise):
    a frame cut short, by a guest or by the leftovers of an earlier connection, must not hold
    the reader forever."""
    first = await reader.readexactly(1)
    try:
        async with asyncio.timeout(within):
            header = decode_header(first + await reader.readexactly(HEADER.size - 1))
            payload = await reader.readexactly(header.length) if header.length else b""
    except TimeoutError:
        raise ProtocolError(f"a frame begun but not finished in {within:g} s") from None
    return _frame(header, payload)
