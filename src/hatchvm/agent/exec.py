"""Commands in the guest, through its agent (capability "exec"): run one in the foreground and
stream or collect its output, start one in the background, and list, read, signal or forget
background processes.

Whatever the agent sends is bounded here too: output past the limit the agent was given is a
protocol error (it drops that itself), and a command that outlives its own timeout by GRACE_S is
given up on (AgentTimeout), whatever the agent does."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from hatchvm.agent.channel import AgentChannel, Exchange
from hatchvm.agent.errors import AgentTimeout, ProtocolError
from hatchvm.agent.inputs import send_input
from hatchvm.agent.messages import check_reply
from hatchvm.agent.protocol import Fields, Frame, MsgType, Record, Tag, int_field, text_field

WINDOW = 12  # output frames (<= 32 KiB each) in flight per command
GRACE_S = 10.0  # how long past a command's timeout hatchd still waits for its exit
KEPT_BYTES = 256 << 10  # what the agent keeps per stream of a background process

Stream = Literal["stdout", "stderr"]
_STREAMS: dict[int, Stream] = {1: "stdout", 2: "stderr"}


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    stdin: bytes | None = None
    timeout_s: float | None = None  # None: no limit (background processes only)

    def fields(self, *, limit: int | None, background: bool) -> Fields:
        fields = [text_field(Tag.ARGV, arg) for arg in self.argv]
        fields += [text_field(Tag.ENV, f"{name}={value}") for name, value in self.env]
        if self.cwd is not None:
            fields.append(text_field(Tag.CWD, self.cwd))
        if self.timeout_s is not None:
            fields.append(int_field(Tag.TIMEOUT_MS, max(1, round(self.timeout_s * 1000))))
        if limit is not None:
            fields.append(int_field(Tag.LIMIT, limit))
        if background:
            fields.append(int_field(Tag.BACKGROUND, 1))
        if self.stdin is not None:
            fields.append(int_field(Tag.STDIN, 1))
        return tuple(fields)


@dataclass(frozen=True)
class Output:
    stream: Stream
    data: bytes


@dataclass(frozen=True)
class Exit:
    exit_code: int | None  # None when a signal ended it
    signal: int | None
    timed_out: bool
    truncated: bool  # the agent dropped output past the limit


@dataclass(frozen=True)
class Result:
    exit: Exit
    stdout: bytes
    stderr: bytes
    truncated: bool  # either stream was cut at the limit


@dataclass(frozen=True)
class Process:
    pid: int
    cmd: str
    running: bool
    exit_code: int | None
    signal: int | None
    timed_out: bool
    started_ns: int
    ended_ns: int | None
    stdout_bytes: int  # written in all (the agent keeps the last KEPT_BYTES)
    stderr_bytes: int

    @classmethod
    def of(cls, record: Record) -> Process:
        pid = record.get_int(Tag.PID)
        if pid is None:
            raise ProtocolError("a process without a pid")
        running = bool(record.get_int(Tag.RUNNING))
        return cls(
            pid=pid,
            cmd=(record.get_text(Tag.CMD) or "")[:1024],
            running=running,
            exit_code=None if running else record.get_int(Tag.EXIT_CODE),
            signal=None if running else record.get_int(Tag.SIGNAL),
            timed_out=bool(record.get_int(Tag.TIMED_OUT)),
            started_ns=record.get_int(Tag.STARTED_NS) or 0,
            ended_ns=None if running else record.get_int(Tag.ENDED_NS),
            stdout_bytes=max(0, record.get_int(Tag.OUT_BYTES) or 0),
            stderr_bytes=max(0, record.get_int(Tag.ERR_BYTES) or 0),
        )


def _exit(frame: Frame) -> Exit:
    exit_code, signal = frame.get_int(Tag.EXIT_CODE), frame.get_int(Tag.SIGNAL)
    if (exit_code is None) == (signal is None):
        raise ProtocolError("an exit with neither or both of an exit code and a signal")
    return Exit(
        exit_code=exit_code,
        signal=signal,
        timed_out=bool(frame.get_int(Tag.TIMED_OUT)),
        truncated=bool(frame.get_int(Tag.TRUNCATED)),
    )


def _output(frame: Frame) -> Output:
    stream = _STREAMS.get(frame.get_int(Tag.STREAM) or 0)
    if stream is None:
        raise ProtocolError("output of no known stream")
    return Output(stream, frame.get(Tag.DATA) or b"")


def _only(frame: Frame, tag: int) -> Record:
    records = frame.records(tag)
    if len(records) != 1:
        raise ProtocolError(f"{len(records)} records where one was due")
    return records[0]


class Execution:
    """A command running in the foreground: start() it, then take its events (output as it
    comes, then the exit) or collect() them; either closes it. Closing it early kills it."""

    def __init__(self, exchange: Exchange, pid: int, command: Command) -> None:
        self._exchange = exchange
        self.pid = pid
        self._command = command
        timeout = command.timeout_s if command.timeout_s is not None else 0.0
        self._deadline = time.monotonic() + timeout + GRACE_S

    @classmethod
    async def start(
        cls, channel: AgentChannel, command: Command, *, limit: int | None, timeout: float
    ) -> Execution:
        """Send the command (and its stdin); back once it runs. timeout bounds each wait for
        the agent until then; AgentRefused when it cannot be run (field: cmd or cwd)."""
        fields = command.fields(limit=limit, background=False)
        exchange = channel.exchange(MsgType.EXEC, fields, timeout, window=WINDOW)
        await exchange.start()
        try:
            if command.stdin is not None:
                await send_input(exchange, MsgType.EXEC, [command.stdin])
            first = check_reply(MsgType.EXEC, await exchange.next())
            pid = first.get_int(Tag.PID)
            if first.end or pid is None:
                raise ProtocolError("a command that never started")
        except BaseException:
            await exchange.close()
            raise
        return cls(exchange, pid, command)

    async def events(self) -> AsyncIterator[Output | Exit]:
        """Output as the command writes it, then its Exit."""
        try:
            while True:
                left = self._deadline - time.monotonic()
                try:
                    frame = await self._exchange.next(timeout=left)
                except AgentTimeout:
                    raise AgentTimeout(
                        f"the guest agent did not end the command within {GRACE_S:g} s "
                        "past its timeout"
                    ) from None
                frame = check_reply(MsgType.EXEC, frame)
                if frame.end:
                    yield _exit(frame)
                    return
                yield _output(frame)
        finally:
            await self.close()

    async def collect(self, limit: int) -> Result:
        """Everything, each stream at most limit bytes (the limit it was started with: the
        agent drops the rest and says so)."""
        kept = {"stdout": bytearray(), "stderr": bytearray()}
        async for event in self.events():
            if isinstance(event, Exit):
                out, err = bytes(kept["stdout"]), bytes(kept["stderr"])
                return Result(event, out, err, truncated=event.truncated)
            buf = kept[event.stream]
            if len(buf) + len(event.data) > limit:
                raise ProtocolError(f"more than the {limit} bytes of {event.stream} asked for")
            buf += event.data
        raise ProtocolError("the answer ended without an exit")

    async def close(self) -> None:
        await self._exchange.close()


async def start_background(channel: AgentChannel, command: Command, timeout: float) -> Process:
    fields = command.fields(limit=None, background=True)
    frame = check_reply(MsgType.EXEC, await channel.request(MsgType.EXEC, fields, timeout))
    return Process.of(_only(frame, Tag.PROC))


async def list_processes(channel: AgentChannel, timeout: float) -> list[Process]:
    frame = await channel.request(MsgType.PROC_LIST, (), timeout)
    return [Process.of(r) for r in check_reply(MsgType.PROC_LIST, frame).records(Tag.PROC)]


async def read_process(
    channel: AgentChannel, pid: int, timeout: float
) -> tuple[Process, bytes, bytes]:
    """The process and the output the agent kept of it (the last KEPT_BYTES per stream)."""
    kept = {"stdout": bytearray(), "stderr": bytearray()}
    fields = (int_field(Tag.PID, pid),)
    async with channel.exchange(MsgType.PROC_GET, fields, timeout, window=WINDOW) as exchange:
        process = Process.of(_only(check_reply(MsgType.PROC_GET, await exchange.next()), Tag.PROC))
        while True:
            frame = check_reply(MsgType.PROC_GET, await exchange.next())
            if frame.end:
                return process, bytes(kept["stdout"]), bytes(kept["stderr"])
            output = _output(frame)
            buf = kept[output.stream]
            if len(buf) + len(output.data) > KEPT_BYTES:
                raise ProtocolError(f"more than the {KEPT_BYTES} bytes kept of a stream")
            buf += output.data


async def kill_process(
    channel: AgentChannel, pid: int, signal: int, *, forget: bool, timeout: float
) -> Process:
    """Signal the process's group (0: none) and, with forget, drop it from the list."""
    fields = (
        int_field(Tag.PID, pid),
        int_field(Tag.SIGNAL, signal),
        int_field(Tag.FORGET, int(forget)),
    )
    frame = await channel.request(MsgType.PROC_KILL, fields, timeout)
    return Process.of(_only(check_reply(MsgType.PROC_KILL, frame), Tag.PROC))
