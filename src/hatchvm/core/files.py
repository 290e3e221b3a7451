"""Files in a user's VM: upload and download streamed (hatchd holds a few frames of them at a
time, whatever their size), stat, list and delete."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from hatchvm.agent import files
from hatchvm.agent.files import Download, Entry, FileStat
from hatchvm.core.guest import STALL_S, GuestService


class FileService:
    def __init__(self, guest: GuestService) -> None:
        self.guest = guest

    async def stat(self, user_id: str, vm_id: str, path: str) -> FileStat:
        async with self.guest.agent(user_id, vm_id, "files") as channel:
            return await files.stat(channel, path, STALL_S)

    async def list(self, user_id: str, vm_id: str, path: str) -> tuple[list[Entry], bool]:
        """The directory's entries, sorted by name; True when cut at files.MAX_ENTRIES."""
        async with self.guest.agent(user_id, vm_id, "files") as channel:
            entries, truncated = await files.list_dir(channel, path, STALL_S)
        return sorted(entries, key=lambda e: e.name), truncated

    async def delete(self, user_id: str, vm_id: str, path: str, *, recursive: bool) -> None:
        async with self.guest.agent(user_id, vm_id, "files") as channel:
            await files.delete(channel, path, recursive=recursive, timeout=STALL_S)

    async def upload(
        self,
        user_id: str,
        vm_id: str,
        path: str,
        body: AsyncIterable[bytes],
        *,
        mode: int | None,
        parents: bool,
    ) -> FileStat:
        """Write the file from body; the guest is asked first, so a refusal comes before
        body is read."""
        async with self.guest.agent(user_id, vm_id, "files") as channel:
            return await files.upload(
                channel, path, body, mode=mode, parents=parents, timeout=STALL_S
            )

    async def download(
        self, user_id: str, vm_id: str, path: str
    ) -> tuple[FileStat, AsyncIterator[bytes]]:
        """The file's stat (a refusal is raised here, before any answer) and its bytes."""
        async with self.guest.agent(user_id, vm_id, "files") as channel:
            download = await Download.open(channel, path, STALL_S)
        return download.stat, self._chunks(vm_id, download)

    async def _chunks(self, vm_id: str, download: Download) -> AsyncIterator[bytes]:
        try:
            with self.guest.using(vm_id):
                async for chunk in download.chunks():
                    yield chunk
        finally:
            await download.close()
