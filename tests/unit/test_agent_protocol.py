"""The guest agent's wire format: round trips, and every kind of bad input refused cleanly."""

from __future__ import annotations

import asyncio
import random

import pytest

from hatchvm.agent.errors import AgentRefused, ProtocolError
from hatchvm.agent.messages import (
    check_reply,
    hello_request,
    parse_hello,
    parse_sync,
    sync_request,
)
from hatchvm.agent.protocol import (
    END,
    HEADER,
    MAX_PAYLOAD,
    REPLY,
    VERSION,
    ErrorCode,
    Frame,
    MsgType,
    Tag,
    decode,
    encode,
    int_field,
    read_frame,
    text_field,
)


def test_the_header_is_16_bytes_big_endian() -> None:
    data = encode(Frame(MsgType.PING, 0x01020304, ((Tag.DATA, b"hi"),)))
    assert HEADER.size == 16
    assert data[:16] == b"HV\x01\x02\x01\x02\x03\x04\x00\x01\x00\x00\x00\x00\x00\x08"
    assert data[16:] == b"\x00\x04\x00\x00\x00\x02hi"


def test_round_trip_keeps_repeated_and_unknown_fields_in_order() -> None:
    fields = (
        int_field(Tag.VERSION, -7),
        text_field(Tag.CAP, "sync"),
        text_field(Tag.CAP, "ping"),
        (999, b"\x00" * 10),  # a tag from a later version: carried, not refused
        (Tag.DATA, b""),
    )
    frame = Frame(MsgType.HELLO | REPLY, 42, fields, flags=0)
    data = encode(frame)
    assert decode(data + b"extra") == (frame, len(data))
    assert frame.get_int(Tag.VERSION) == -7
    assert frame.get_all(Tag.CAP) == [b"sync", b"ping"]
    assert not frame.end


def test_incomplete_input_asks_for_more() -> None:
    data = encode(Frame(MsgType.SYNC, 1, (int_field(Tag.TIME_NS, 5),)))
    for cut in range(len(data)):
        assert decode(data[:cut]) is None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"XX" + bytes(14), "bad magic"),
        (b"HV\x01\x01\x00\x00\x00\x01\x00\x01\x00\x07\x00\x00\x00\x00", "reserved"),
        (b"HV\x01\x01\x00\x00\x00\x01\x00\x01\x00\x00\x00\x01\x00\x01", "exceeds"),
        (b"HV\x01\x01\x00\x00\x00\x01\x00\x01\x00\x00\xff\xff\xff\xff", "exceeds"),
    ],
)
def test_bad_headers_are_protocol_errors(data: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        decode(data)


def test_the_payload_bound_is_exact() -> None:
    biggest = Frame(MsgType.PING, 1, ((Tag.DATA, b"x" * (MAX_PAYLOAD - 6)),))
    assert decode(encode(biggest)) is not None
    with pytest.raises(ValueError, match="exceeds"):
        encode(Frame(MsgType.PING, 1, ((Tag.DATA, b"x" * (MAX_PAYLOAD - 5)),)))


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x04",  # half a field header
        b"\x00\x04\x00\x00\x00\x09short",  # a value running past the frame
        b"\x00\x04\x00\x00\x00\x00\x00",  # a good empty field, then a stray byte
    ],
)
def test_malformed_fields_are_protocol_errors(payload: bytes) -> None:
    header = HEADER.pack(b"HV", VERSION, MsgType.PING, 1, END, 0, len(payload))
    with pytest.raises(ProtocolError):
        decode(header + payload)


def test_a_frame_of_another_version_is_delimited_not_parsed() -> None:
    payload = b"whatever version 2 puts here"
    header = HEADER.pack(b"HV", 2, MsgType.PING, 9, END, 0, len(payload))
    frame, used = decode(header + payload + b"HV")  # type: ignore[misc]
    assert (frame.version, frame.id, frame.fields, used) == (2, 9, (), 16 + len(payload))


def test_garbage_never_escapes_as_anything_but_protocol_error() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        size = rng.choice([rng.randrange(0, 40), rng.randrange(0, 400)])
        data = bytes(rng.randrange(256) for _ in range(size))
        if rng.random() < 0.5:  # often a plausible header, so the field parser is reached
            length = min(len(data), rng.randrange(0, 64))
            data = HEADER.pack(b"HV", VERSION, 0x81, 1, END, 0, length) + data
        try:
            result = decode(data)
        except ProtocolError:
            continue
        if result is not None:
            frame, used = result
            assert used <= len(data)
            try:
                parse_hello(frame)
            except (ProtocolError, AgentRefused):
                pass


def test_integers_must_be_eight_bytes() -> None:
    frame = Frame(MsgType.SYNC | REPLY, 1, ((Tag.TIME_NS, b"\x01\x02"),))
    with pytest.raises(ProtocolError, match="not an integer"):
        parse_sync(frame)


def test_messages() -> None:
    kind, fields = sync_request(1_700_000_000_123_456_789, b"r" * 64)
    request = decode(encode(Frame(kind, 3, fields)))[0]  # type: ignore[index]
    assert request.type == MsgType.SYNC
    assert request.get_int(Tag.TIME_NS) == 1_700_000_000_123_456_789
    assert request.get(Tag.ENTROPY) == b"r" * 64

    answer = Frame(MsgType.SYNC | REPLY, 3, (int_field(Tag.TIME_NS, 55),))
    assert parse_sync(answer) == 55
    kind, _ = hello_request("hatchd test")
    hello = Frame(
        kind | REPLY,
        1,
        (int_field(Tag.VERSION, 1), text_field(Tag.AGENT, "a"), text_field(Tag.CAP, "sync")),
    )
    assert parse_hello(hello).capabilities == {"sync"}
    with pytest.raises(ProtocolError, match="without a version"):
        parse_hello(Frame(kind | REPLY, 1))


def test_error_frames_become_agent_refused_and_wrong_answers_protocol_errors() -> None:
    error = Frame(
        MsgType.ERROR,
        3,
        (int_field(Tag.CODE, ErrorCode.FAILED), text_field(Tag.MESSAGE, "clock_settime: EPERM")),
    )
    with pytest.raises(AgentRefused, match=r"FAILED.*clock_settime: EPERM") as err:
        check_reply(MsgType.SYNC, error)
    assert err.value.code == ErrorCode.FAILED
    with pytest.raises(AgentRefused, match=r"\(77\)"):
        check_reply(MsgType.SYNC, Frame(MsgType.ERROR, 3, (int_field(Tag.CODE, 77),)))
    with pytest.raises(ProtocolError, match="answer of type"):
        check_reply(MsgType.SYNC, Frame(MsgType.PING | REPLY, 3))


async def test_read_frame_reads_one_frame_and_refuses_oversized_headers() -> None:
    reader = asyncio.StreamReader()
    one = encode(Frame(MsgType.PING, 1, ((Tag.DATA, b"a"),)))
    reader.feed_data(one + encode(Frame(MsgType.PING, 2)))
    reader.feed_data(b"HV\x01\x01\x00\x00\x00\x03\x00\x01\x00\x00\x7f\xff\xff\xff")
    assert (await read_frame(reader)).id == 1
    assert (await read_frame(reader)).id == 2
    with pytest.raises(ProtocolError, match="exceeds"):
        await read_frame(reader)  # refused on its header: its 2 GiB are never awaited
    reader.feed_data(b"HV\x01")
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await read_frame(reader)
