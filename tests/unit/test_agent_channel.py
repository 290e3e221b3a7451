"""hatchd's agent channel against fake agents on a Unix socket: answers matched by id, streams,
timeouts, and guests that speak garbage, flood, or go away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from hatchvm.agent import channel as channel_module
from hatchvm.agent.agents import Agents
from hatchvm.agent.channel import MAX_UNSOLICITED, QUEUE_FRAMES, AgentChannel
from hatchvm.agent.errors import AgentTimeout, AgentUnavailable, ProtocolError
from hatchvm.agent.messages import ping_request
from hatchvm.agent.protocol import REPLY, Frame, MsgType, Tag, encode, int_field, read_frame

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_agent(path: Path, handler: Handler) -> AsyncIterator[list[int]]:
    """A Unix socket served by handler; yields the list of connections it accepted."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections) + 1)
        with contextlib.suppress(Exception):
            await handler(reader, writer)
        writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    try:
        yield connections
    finally:
        server.close()


async def echo_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers PING with its data and SYNC with the time it was given."""
    while True:
        request = await read_frame(reader)
        if request.type == MsgType.PING:
            answer = Frame(request.type | REPLY, request.id, ((Tag.DATA, request.get(Tag.DATA)),))
        else:
            answer = Frame(request.type | REPLY, request.id, request.fields[:1])
        writer.write(encode(answer))
        await writer.drain()


async def ping(channel: AgentChannel, data: bytes, timeout: float = 2.0) -> bytes:
    frame = await channel.request(*ping_request(data), timeout)
    return frame.get(Tag.DATA) or b""


async def test_answers_are_matched_by_id_even_out_of_order(tmp_path: Path) -> None:
    async def backwards(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first, second = await read_frame(reader), await read_frame(reader)
        for request in (second, first):
            writer.write(encode(Frame(MsgType.PING | REPLY, request.id, request.fields)))

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, backwards):
        channel = AgentChannel("vm_t", sock)
        assert await asyncio.gather(ping(channel, b"one"), ping(channel, b"two")) == [
            b"one",
            b"two",
        ]
        channel.close()


async def test_a_stream_ends_with_the_end_flag(tmp_path: Path) -> None:
    async def chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_frame(reader)
        for n in range(3):
            writer.write(encode(Frame(0x91, request.id, ((Tag.DATA, b"%d" % n),), flags=0)))
        writer.write(encode(Frame(0x92, request.id, (int_field(Tag.CODE, 0),))))
        await read_frame(reader)  # keep the connection open

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, chunks):
        channel = AgentChannel("vm_t", sock)
        frames = [f async for f in channel.stream(0x10, (), 2.0)]
        assert [f.type for f in frames] == [0x91, 0x91, 0x91, 0x92]
        assert [f.end for f in frames] == [False, False, False, True]
        channel.close()


async def test_no_socket_is_unavailable(tmp_path: Path) -> None:
    channel = AgentChannel("vm_t", tmp_path / "missing.sock")
    with pytest.raises(AgentUnavailable, match="cannot reach"):
        await ping(channel, b"x")


async def test_silence_times_out_within_the_bound(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, silent):
        channel = AgentChannel("vm_t", sock)
        with pytest.raises(AgentTimeout, match=r"did not answer in 0\.3 s"):
            await ping(channel, b"x", timeout=0.3)
        channel.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 64,  # no magic
        b"HV\x01\x82\x00\x00\x00\x01\x00\x01\x00\x00\x7f\xff\xff\xff",  # a 2 GiB frame
        b"HV\x01\x82\x00\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x03abc",  # bad fields
    ],
)
async def test_garbage_drops_the_connection_and_the_next_request_reconnects(
    tmp_path: Path, garbage: bytes
) -> None:
    async def bad_then_good(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(connections) == 1:
            await read_frame(reader)
            writer.write(garbage)
            await writer.drain()
            await reader.read()  # hatchd must hang up, not wait for more
            return
        await echo_agent(reader, writer)

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, bad_then_good) as connections:
        channel = AgentChannel("vm_t", sock)
        with pytest.raises(ProtocolError, match="broke the protocol"):
            await ping(channel, b"x")
        assert await ping(channel, b"again") == b"again"
        assert len(connections) == 2
        channel.close()


async def test_a_frame_cut_short_drops_the_connection_within_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half a frame and then silence (a guest's trick, or bytes left from an earlier
    connection) fails the waiting request and frees the channel; the next one reconnects."""
    monkeypatch.setattr(channel_module, "FRAME_S", 0.5)

    async def half_then_good(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(connections) == 1:
            request = await read_frame(reader)
            whole = encode(Frame(MsgType.PING | REPLY, request.id, request.fields))
            writer.write(whole[: len(whole) - 3])
            await writer.drain()
            await reader.read()  # hatchd must hang up
            return
        await echo_agent(reader, writer)

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, half_then_good) as connections:
        channel = AgentChannel("vm_t", sock)
        # Not the request's own 30 s timeout (AgentTimeout): the frame's bound.
        with pytest.raises(ProtocolError, match=r"begun but not finished in 0\.5 s"):
            await ping(channel, b"x", timeout=30)
        assert await ping(channel, b"again") == b"again"
        assert len(connections) == 2
        channel.close()


async def test_an_endless_garbage_stream_is_read_no_further_than_one_header(
    tmp_path: Path,
) -> None:
    sent = 0

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        chunk = b"\xab" * 65536
        while True:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, firehose):
        channel = AgentChannel("vm_t", sock)
        with pytest.raises(ProtocolError):
            await ping(channel, b"x")
        channel.close()
    # The guest could write until the socket's buffers were full, and no further.
    assert sent < 16 << 20


async def test_a_flood_of_frames_nobody_asked_for_is_cut_off(tmp_path: Path) -> None:
    seen: list[Frame] = []

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_frame(reader)
        for n in range(10_000):
            writer.write(encode(Frame(MsgType.SYNC | REPLY, 1_000_000 + n)))
            await writer.drain()
        writer.write(encode(Frame(MsgType.PING | REPLY, request.id)))

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, flood):
        channel = AgentChannel("vm_t", sock, seen.append)
        with pytest.raises(ProtocolError, match="nobody asked for"):
            await ping(channel, b"x")
        assert len(seen) == MAX_UNSOLICITED
        channel.close()


async def test_frames_past_the_credit_granted_are_cut_off(tmp_path: Path) -> None:
    """An agent that ignores the window: however slow the consumer, no more than the window
    is ever queued, and the frame past it drops the connection."""

    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_frame(reader)
        for _ in range(QUEUE_FRAMES * 4):
            writer.write(encode(Frame(0x91, request.id, flags=0)))
        await writer.drain()
        await reader.read()

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, chatty):
        channel = AgentChannel("vm_t", sock)
        taken = 0
        with pytest.raises(ProtocolError, match="frames granted for one answer"):
            async for _frame in channel.stream(0x10, (), 2.0, window=4):
                taken += 1
                await asyncio.sleep(0.01)  # a slow consumer
        assert taken <= 4
        channel.close()


async def test_the_agent_going_away_fails_waiters_at_once(tmp_path: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)

    sock = tmp_path / "a.sock"
    async with fake_agent(sock, hang_up):
        channel = AgentChannel("vm_t", sock)
        started = time.monotonic()
        with pytest.raises(AgentUnavailable, match="port closed"):
            await ping(channel, b"x", timeout=30)
        assert time.monotonic() - started < 10  # not the 30 s timeout
        channel.close()


async def test_after_resume_syncs_or_warns(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    agents = Agents(timeout=0.5)
    async with fake_agent(sock, echo_agent):
        await agents.attach("vm_t", sock, restored=True)
        assert await agents.after_resume("vm_t") is None
        result = await agents.sync("vm_t")
        assert result.round_trip_s >= 0
    await agents.attach("vm_t", tmp_path / "gone.sock", restored=True)
    warning = await agents.after_resume("vm_t")
    assert warning is not None and warning.startswith("clock not synced, RNG not reseeded: ")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with fake_agent(sock, silent):
        await agents.attach("vm_t", sock, restored=True)
        assert await agents.after_resume("vm_t") == (
            "clock not synced, RNG not reseeded: the guest agent did not answer in 0.5 s"
        )
    await agents.close()


async def test_a_late_sync_answer_triggers_a_fresh_sync(tmp_path: Path) -> None:
    """An agent that was stuck answers an old sync (it just set the guest's clock to a time
    long past): hatchd syncs it again at once."""
    syncs: list[int] = []
    two = asyncio.Event()

    async def stuck_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stuck = False
        while True:
            request = await read_frame(reader)
            if request.type == MsgType.SYNC:
                if not stuck:
                    stuck = True
                    await asyncio.sleep(0.8)  # past hatchd's 0.3 s
                syncs.append(request.get_int(Tag.TIME_NS) or 0)
                if len(syncs) >= 2:
                    two.set()
            writer.write(encode(Frame(request.type | REPLY, request.id, request.fields[:1])))
            await writer.drain()

    sock = tmp_path / "a.sock"
    agents = Agents(timeout=0.3)
    async with fake_agent(sock, stuck_once):
        await agents.attach("vm_t", sock, restored=True)
        assert "did not answer" in (await agents.after_resume("vm_t") or "")
        await asyncio.wait_for(two.wait(), 10)
        assert syncs[-1] > syncs[0]  # a newer time followed the stale one
    await agents.close()


async def test_a_restored_guest_is_synced_before_it_is_greeted(tmp_path: Path) -> None:
    """The wake waits for the sync: nothing else (the hello) is queued in the guest before it.
    A guest that did not wake from a snapshot is greeted first, then synced."""
    seen: list[int] = []
    first, both = asyncio.Event(), asyncio.Event()

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_frame(reader)
            seen.append(request.type)
            first.set()
            if len(seen) == 2:
                both.set()
            writer.write(encode(Frame(request.type | REPLY, request.id, request.fields[:1])))
            await writer.drain()

    sock = tmp_path / "a.sock"
    agents = Agents(timeout=2.0)
    async with fake_agent(sock, recording):
        await agents.attach("vm_t", sock, restored=True)
        assert await agents.after_resume("vm_t") is None
        await asyncio.wait_for(both.wait(), 10)
        assert seen == [MsgType.SYNC, MsgType.HELLO]

        seen.clear()
        first.clear()
        await agents.attach("vm_t", sock)  # booted: greeted at once (synced once it answers)
        await asyncio.wait_for(first.wait(), 10)
        assert seen[0] == MsgType.HELLO
    await agents.close()
