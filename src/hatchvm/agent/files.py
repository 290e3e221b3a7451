"""Files in the guest, through its agent (capability "files"): read and write them streamed in
frames, stat, list and delete. Paths are absolute paths in the guest; a refusal comes back as
AgentRefused with the guest's errno (ENOENT, EISDIR, ...), which the caller turns into a status.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Literal, cast

from hatchvm.agent.channel import AgentChannel, Exchange
from hatchvm.agent.errors import ProtocolError
from hatchvm.agent.inputs import send_input
from hatchvm.agent.messages import check_reply
from hatchvm.agent.protocol import Frame, MsgType, Record, Tag, int_field, text_field

WINDOW = 12  # frames (<= 32 KiB each) of a file or a listing in flight
MAX_ENTRIES = 10_000  # entries of one listing; the rest is cut off (truncated)

Kind = Literal["file", "dir", "symlink", "other"]
_KINDS = ("file", "dir", "symlink", "other")


@dataclass(frozen=True)
class FileStat:
    kind: Kind
    size: int
    mode: int  # permission bits
    mtime_ns: int

    @classmethod
    def of(cls, item: Frame | Record) -> FileStat:
        kind = item.get_text(Tag.KIND)
        size, mode = item.get_int(Tag.SIZE), item.get_int(Tag.MODE)
        if size is None or mode is None:
            raise ProtocolError("a file without a size or a mode")
        return cls(
            kind=cast(Kind, kind if kind in _KINDS else "other"),
            size=max(0, size),
            mode=mode & 0o7777,
            mtime_ns=item.get_int(Tag.MTIME_NS) or 0,
        )


@dataclass(frozen=True)
class Entry:
    name: str
    stat: FileStat


def _path(path: str) -> tuple[int, bytes]:
    return text_field(Tag.PATH, path)


async def stat(channel: AgentChannel, path: str, timeout: float) -> FileStat:
    """What is at path (symlinks followed)."""
    frame = await channel.request(MsgType.FILE_STAT, (_path(path),), timeout)
    return FileStat.of(check_reply(MsgType.FILE_STAT, frame))


async def delete(channel: AgentChannel, path: str, *, recursive: bool, timeout: float) -> None:
    fields = (_path(path), int_field(Tag.RECURSIVE, int(recursive)))
    check_reply(MsgType.FILE_DELETE, await channel.request(MsgType.FILE_DELETE, fields, timeout))


async def list_dir(
    channel: AgentChannel, path: str, timeout: float, max_entries: int = MAX_ENTRIES
) -> tuple[list[Entry], bool]:
    """The directory's entries (not . and ..; symlinks not followed), and whether there were
    more than max_entries (the listing is then cut off there)."""
    entries: list[Entry] = []
    fields = (_path(path),)
    async with channel.exchange(MsgType.FILE_LIST, fields, timeout, window=WINDOW) as exchange:
        while True:
            frame = check_reply(MsgType.FILE_LIST, await exchange.next())
            for record in frame.records(Tag.ENTRY):
                if len(entries) == max_entries:
                    return entries, True  # leaving the exchange cancels the rest
                name = (record.get_text(Tag.NAME) or "")[:1024]
                entries.append(Entry(name, FileStat.of(record)))
            if frame.end:
                return entries, False


class Download:
    """A file being read: open() answers with its stat (or the refusal); chunks() then
    yields its bytes and closes it. Closing early cancels the read in the guest."""

    def __init__(self, exchange: Exchange, stat: FileStat) -> None:
        self._exchange = exchange
        self.stat = stat

    @classmethod
    async def open(cls, channel: AgentChannel, path: str, timeout: float) -> Download:
        exchange = channel.exchange(MsgType.FILE_READ, (_path(path),), timeout, window=WINDOW)
        await exchange.start()
        try:
            first = check_reply(MsgType.FILE_READ, await exchange.next())
            if first.end:
                raise ProtocolError("a file read that ended before it began")
            return cls(exchange, FileStat.of(first))
        except BaseException:
            await exchange.close()
            raise

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                frame = check_reply(MsgType.FILE_READ, await self._exchange.next())
                data = frame.get(Tag.DATA)
                if data:
                    yield data
                if frame.end:
                    return
        finally:
            await self.close()

    async def close(self) -> None:
        await self._exchange.close()


async def upload(
    channel: AgentChannel,
    path: str,
    chunks: AsyncIterable[bytes],
    *,
    mode: int | None,
    parents: bool,
    timeout: float,
) -> FileStat:
    """Write the file from chunks (replacing it whole at the end, or not at all); its stat.
    The agent is asked first, so a refusal (no such directory) comes before any byte is read
    from chunks."""
    fields = [_path(path), int_field(Tag.PARENTS, int(parents))]
    if mode is not None:
        fields.append(int_field(Tag.MODE, mode))
    exchange = channel.exchange(MsgType.FILE_WRITE, tuple(fields), timeout, window=1)
    async with exchange:
        ready = check_reply(MsgType.FILE_WRITE, await exchange.next())
        if ready.end:
            raise ProtocolError("a file write that ended before it began")
        await send_input(exchange, MsgType.FILE_WRITE, chunks)
        done = check_reply(MsgType.FILE_WRITE, await exchange.next())
        if not done.end:
            raise ProtocolError("a file write answered with more than its end")
        return FileStat.of(done)
