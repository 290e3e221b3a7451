"""Exec and files end to end without a VM: hatchd's AgentChannel and the real guest agent
(compiled as the image builder does, run with --stdio and no privileges), over a Unix socket."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hatchvm.agent import exec as agent_exec
from hatchvm.agent import files
from hatchvm.agent.channel import AgentChannel
from hatchvm.agent.errors import AgentRefused
from hatchvm.agent.exec import Command, Execution, Exit, Output
from hatchvm.agent.messages import parse_ping, ping_request
from hatchvm.agent.protocol import ErrorCode
from tests.support.agent import AgentServer, built_agent

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")

T = 10.0  # the bound of every wait for the agent here


@pytest.fixture(scope="module")
def agent_binary() -> Iterator[Path]:
    with built_agent() as binary:
        yield binary


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory the unprivileged agent may write in."""
    path = Path(tempfile.mkdtemp(prefix="hatch-files-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def channel(agent_binary: Path) -> AsyncIterator[AgentChannel]:
    sock_dir = Path(tempfile.mkdtemp(prefix="hva-"))
    server = AgentServer(agent_binary, sock_dir / "a.sock")
    channel = AgentChannel("vm_t", server.path)
    yield channel
    channel.close()
    await asyncio.to_thread(server.close)
    shutil.rmtree(sock_dir, ignore_errors=True)


async def ended(pid: int, timeout: float = 5.0) -> bool:
    """Whether the process is gone (or a zombie) within timeout."""
    for _ in range(int(timeout / 0.05)):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
        except (OSError, IndexError):
            return True
        if state in "ZX":
            return True
        await asyncio.sleep(0.05)
    return False


async def run(channel: AgentChannel, command: Command, limit: int = 1 << 20) -> agent_exec.Result:
    execution = await Execution.start(channel, command, limit=limit, timeout=T)
    return await execution.collect(limit)


async def test_argv_env_cwd_stdin_and_exit_codes(channel: AgentChannel, workdir: Path) -> None:
    result = await run(channel, Command(("echo", "hello", "world"), timeout_s=T))
    assert result.stdout == b"hello world\n" and result.stderr == b""
    assert result.exit == Exit(exit_code=0, signal=None, timed_out=False, truncated=False)

    script = 'echo "$GREETING from $(pwd)"; cat; echo oops >&2; exit 3'
    result = await run(
        channel,
        Command(
            ("/bin/sh", "-c", script),
            env=(("GREETING", "hi"),),
            cwd=str(workdir),
            stdin=b"fed through stdin\n",
            timeout_s=T,
        ),
    )
    assert result.stdout == f"hi from {workdir}\nfed through stdin\n".encode()
    assert result.stderr == b"oops\n"
    assert result.exit.exit_code == 3

    # The base environment is there unless overridden; stdin defaults to /dev/null.
    result = await run(channel, Command(("/bin/sh", "-c", "echo $PATH; cat"), timeout_s=T))
    assert result.stdout.startswith(b"/usr/local/sbin:") and result.exit.exit_code == 0


async def test_a_command_that_cannot_run_names_the_field(channel: AgentChannel) -> None:
    with pytest.raises(AgentRefused) as err:
        await Execution.start(
            channel, Command(("no-such-command",), timeout_s=T), limit=1, timeout=T
        )
    assert err.value.field == "cmd" and err.value.errno == errno.ENOENT
    assert "cannot run no-such-command" in err.value.detail
    with pytest.raises(AgentRefused) as err:
        await Execution.start(
            channel, Command(("true",), cwd="/no/such/dir", timeout_s=T), limit=1, timeout=T
        )
    assert err.value.field == "cwd" and err.value.errno == errno.ENOENT
    assert err.value.detail == "/no/such/dir: No such file or directory"


async def test_output_past_the_limit_is_dropped_and_said(channel: AgentChannel) -> None:
    result = await run(
        channel,
        Command(("/bin/sh", "-c", "head -c 3000000 /dev/zero; echo done >&2"), timeout_s=T),
        limit=100_000,
    )
    assert len(result.stdout) == 100_000 and result.truncated
    assert result.stderr == b"done\n" and result.exit.exit_code == 0


async def test_a_timeout_kills_the_whole_process_group(
    channel: AgentChannel, workdir: Path
) -> None:
    marker = workdir / "child.pid"
    started = time.monotonic()
    result = await run(
        channel,
        Command(("/bin/sh", "-c", f"sleep 60 & echo $! > {marker}; wait"), timeout_s=0.5),
    )
    assert time.monotonic() - started < 5
    assert result.exit.timed_out and result.exit.signal == 9 and result.exit.exit_code is None
    assert await ended(int(marker.read_text()))


async def test_output_streams_as_it_comes(channel: AgentChannel, workdir: Path) -> None:
    go = workdir / "go"
    script = f"echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second >&2"
    execution = await Execution.start(
        channel, Command(("/bin/sh", "-c", script), timeout_s=T), limit=None, timeout=T
    )
    events = execution.events()
    assert await anext(events) == Output("stdout", b"first\n")  # before the command ends
    go.touch()
    assert await anext(events) == Output("stderr", b"second\n")
    assert isinstance(await anext(events), Exit)


async def test_a_slow_reader_holds_the_command_back_not_memory(channel: AgentChannel) -> None:
    """The agent sends only what it was granted: the command blocks on its pipe while the
    consumer sleeps, and every byte still arrives, in order."""
    size = 8 << 20
    command = Command(
        ("/bin/sh", "-c", f"head -c {size} /dev/urandom | tee /dev/stderr | sha256sum"),
        timeout_s=60,
    )
    execution = await Execution.start(channel, command, limit=None, timeout=T)
    digest = hashlib.sha256()
    out = b""
    async for event in execution.events():
        if isinstance(event, Output):
            if event.stream == "stderr":
                digest.update(event.data)
                await asyncio.sleep(0.001)
            else:
                out += event.data
    assert out.split()[0].decode() == digest.hexdigest()


async def test_leaving_a_stream_early_kills_the_command(channel: AgentChannel) -> None:
    execution = await Execution.start(
        channel, Command(("yes",), timeout_s=60), limit=None, timeout=T
    )
    pid = execution.pid
    events = execution.events()
    assert isinstance(await anext(events), Output)
    await events.aclose()
    assert await ended(pid)
    # The channel is fine: the frames still on their way were dropped, nothing else.
    frame = await channel.request(*ping_request(b"after"), T)
    assert parse_ping(frame) == b"after"


async def test_background_processes(channel: AgentChannel, workdir: Path) -> None:
    go = workdir / "go"
    script = f"echo started; while [ ! -e {go} ]; do sleep 0.05; done; echo finished >&2; exit 4"
    bg = await agent_exec.start_background(channel, Command(("/bin/sh", "-c", script)), T)
    assert bg.running and bg.cmd.startswith("/bin/sh -c echo started")
    sleeper = await agent_exec.start_background(channel, Command(("sleep", "60")), T)
    listed = await agent_exec.list_processes(channel, T)
    assert [p.pid for p in listed] == [bg.pid, sleeper.pid]

    go.touch()
    for _ in range(200):
        process, out, err = await agent_exec.read_process(channel, bg.pid, T)
        if not process.running:
            break
        await asyncio.sleep(0.05)
    assert (process.exit_code, out, err) == (4, b"started\n", b"finished\n")
    assert process.stdout_bytes == 8 and process.ended_ns

    killed = await agent_exec.kill_process(channel, sleeper.pid, 15, forget=False, timeout=T)
    assert killed.pid == sleeper.pid
    for _ in range(200):
        process, _, _ = await agent_exec.read_process(channel, sleeper.pid, T)
        if not process.running:
            break
        await asyncio.sleep(0.05)
    assert process.signal == 15 and process.exit_code is None

    await agent_exec.kill_process(channel, bg.pid, 0, forget=True, timeout=T)
    assert [p.pid for p in await agent_exec.list_processes(channel, T)] == [sleeper.pid]
    with pytest.raises(AgentRefused) as err:
        await agent_exec.read_process(channel, bg.pid, T)
    assert err.value.code == ErrorCode.NO_SUCH


async def test_background_output_keeps_the_newest_bytes(channel: AgentChannel) -> None:
    script = "i=0; while [ $i -lt 40000 ]; do echo line-$i; i=$((i+1)); done"
    bg = await agent_exec.start_background(channel, Command(("/bin/sh", "-c", script)), T)
    for _ in range(400):
        process, out, _ = await agent_exec.read_process(channel, bg.pid, T)
        if not process.running:
            break
        await asyncio.sleep(0.05)
    assert process.stdout_bytes > agent_exec.KEPT_BYTES
    assert len(out) == agent_exec.KEPT_BYTES and out.endswith(b"line-39999\n")


async def test_files_round_trip(channel: AgentChannel, workdir: Path) -> None:
    data = os.urandom(5 << 20)
    target = workdir / "sub" / "dir" / "blob.bin"

    async def body() -> AsyncIterator[bytes]:
        for at in range(0, len(data), 100_000):  # not the frame size: re-cut on the way
            yield data[at : at + 100_000]

    written = await files.upload(channel, str(target), body(), mode=0o640, parents=True, timeout=T)
    assert (written.kind, written.size, written.mode) == ("file", len(data), 0o640)
    assert target.read_bytes() == data
    assert oct(target.stat().st_mode & 0o777) == oct(0o640)
    assert [p.name for p in target.parent.iterdir()] == ["blob.bin"]  # no temporary left

    stat = await files.stat(channel, str(target), T)
    assert stat.size == len(data) and stat.kind == "file"
    download = await files.Download.open(channel, str(target), T)
    assert download.stat.size == len(data)
    got = b"".join([chunk async for chunk in download.chunks()])
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()

    (workdir / "sub" / "link").symlink_to("dir")
    entries, truncated = await files.list_dir(channel, str(workdir / "sub"), T)
    assert not truncated
    assert sorted((e.name, e.stat.kind) for e in entries) == [("dir", "dir"), ("link", "symlink")]

    # An existing file keeps its mode when none is given.
    await files.upload(channel, str(target), body(), mode=None, parents=False, timeout=T)
    assert oct(target.stat().st_mode & 0o777) == oct(0o640)

    with pytest.raises(AgentRefused) as err:
        await files.delete(channel, str(workdir / "sub"), recursive=False, timeout=T)
    assert err.value.errno == errno.ENOTEMPTY
    await files.delete(channel, str(workdir / "sub"), recursive=True, timeout=T)
    assert list(workdir.iterdir()) == []


async def test_a_big_listing_is_cut_off(channel: AgentChannel, workdir: Path) -> None:
    for n in range(700):
        (workdir / f"file-{n:04}-{'x' * 100}").touch()
    entries, truncated = await files.list_dir(channel, str(workdir), T, max_entries=500)
    assert len(entries) == 500 and truncated
    entries, truncated = await files.list_dir(channel, str(workdir), T)
    assert len(entries) == 700 and not truncated
    frame = await channel.request(*ping_request(b"still here"), T)
    assert parse_ping(frame) == b"still here"


@pytest.mark.parametrize(
    ("make", "call", "expected"),
    [
        (None, "read", errno.ENOENT),
        ("dir", "read", errno.EISDIR),
        (None, "list", errno.ENOENT),
        ("file", "list", errno.ENOTDIR),
        (None, "stat", errno.ENOENT),
        (None, "delete", errno.ENOENT),
        ("dir", "write", errno.EISDIR),
        ("file-parent", "write", errno.ENOTDIR),
        ("no-parent", "write", errno.ENOENT),
    ],
)
async def test_file_errors_carry_the_guests_errno(
    channel: AgentChannel, workdir: Path, make: str | None, call: str, expected: int
) -> None:
    path = workdir / "thing"
    if make == "dir":
        path.mkdir()
    elif make == "file":
        path.touch()
    elif make == "file-parent":
        path.touch()
        path = path / "below"
    elif make == "no-parent":
        path = workdir / "missing" / "below"
    consumed = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal consumed
        consumed = True
        yield b"never sent"

    with pytest.raises(AgentRefused) as err:
        if call == "read":
            await files.Download.open(channel, str(path), T)
        elif call == "list":
            await files.list_dir(channel, str(path), T)
        elif call == "stat":
            await files.stat(channel, str(path), T)
        elif call == "delete":
            await files.delete(channel, str(path), recursive=True, timeout=T)
        else:
            await files.upload(channel, str(path), body(), mode=None, parents=False, timeout=T)
    assert err.value.errno == expected, err.value
    assert not consumed  # a refused upload reads nothing of its body
