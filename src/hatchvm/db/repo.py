"""Small queries shared by core, auth and admin. Each takes a session; callers own transactions."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hatchvm.db.models import FAILED, STORING, VM, ApiKey, Image, Route, Snapshot
from hatchvm.snapshots.manifest import unique_bytes


def _storable(value: str) -> bool:
    """Whether a row could hold this text. PostgreSQL's text cannot hold NUL and refuses such a
    query outright (SQLite just finds nothing), so an id from a URL like /vms/vm_%00 is looked
    up only if it could exist: a 404, not a 500."""
    return "\x00" not in value


async def get_vm(session: AsyncSession, vm_id: str) -> VM | None:
    return await session.get(VM, vm_id) if _storable(vm_id) else None


async def list_vms(session: AsyncSession, user_id: str | None = None) -> list[VM]:
    query = select(VM).order_by(VM.created_at.desc(), VM.id.desc())
    if user_id is not None:
        query = query.where(VM.user_id == user_id)
    return list((await session.scalars(query)).all())


async def vms_by_state(session: AsyncSession) -> dict[str, int]:
    """How many VMs are in each state (states no VM is in are absent)."""
    rows = (await session.execute(select(VM.state, func.count()).group_by(VM.state))).all()
    return {str(state): int(count) for state, count in rows}


async def user_totals(session: AsyncSession, user_id: str) -> tuple[int, int, int]:
    """The user's VM count, vCPUs and memory (MiB), over all their VMs."""
    query = select(
        func.count(),
        func.coalesce(func.sum(VM.vcpu_count), 0),
        func.coalesce(func.sum(VM.mem_mib), 0),
    ).where(VM.user_id == user_id)
    count, vcpus, mem = (await session.execute(query)).one()
    return int(count), int(vcpus), int(mem)


async def snapshot_bytes(session: AsyncSession, user_id: str) -> int:
    """What the user's stored snapshots take in the artifact store: the chunk packs they
    reference counted once (snapshots share them), their listings, old-format snapshots whole."""
    query = select(Snapshot.size_bytes, Snapshot.manifest).where(Snapshot.user_id == user_id)
    return unique_bytes((row.size_bytes, row.manifest) for row in await session.execute(query))


async def user_snapshots(session: AsyncSession, user_id: str) -> list[Snapshot]:
    return list((await session.scalars(select(Snapshot).where(Snapshot.user_id == user_id))).all())


async def snapshot_users(session: AsyncSession) -> set[str]:
    return set((await session.scalars(select(Snapshot.user_id).distinct())).all())


async def used_allocations(session: AsyncSession) -> tuple[set[str], set[str], set[int]]:
    """IPs, MACs and SSH ports held by any VM."""
    rows = (await session.execute(select(VM.guest_ip, VM.guest_mac, VM.ssh_port))).all()
    ips = {r.guest_ip for r in rows if r.guest_ip}
    macs = {r.guest_mac for r in rows if r.guest_mac}
    ports = {r.ssh_port for r in rows if r.ssh_port is not None}
    return ips, macs, ports


async def get_image(session: AsyncSession, image_id: str) -> Image | None:
    return await session.get(Image, image_id) if _storable(image_id) else None


async def list_images(session: AsyncSession) -> list[Image]:
    query = select(Image).order_by(Image.created_at.desc(), Image.id)
    return list((await session.scalars(query)).all())


async def key_by_hash(session: AsyncSession, key_hash: str) -> ApiKey | None:
    if not _storable(key_hash):
        return None
    return await session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))


async def list_keys(session: AsyncSession) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id)
    return list((await session.scalars(query)).all())


async def list_snapshots(session: AsyncSession, vm_id: str) -> list[Snapshot]:
    """Newest first."""
    query = (
        select(Snapshot)
        .where(Snapshot.vm_id == vm_id)
        .order_by(Snapshot.created_at.desc(), Snapshot.id.desc())
    )
    return list((await session.scalars(query)).all())


async def get_snapshot(session: AsyncSession, snapshot_id: str) -> Snapshot | None:
    return await session.get(Snapshot, snapshot_id) if _storable(snapshot_id) else None


async def count_restorable(session: AsyncSession, vm_id: str) -> int:
    """Snapshots the VM can resume from: every one but those that failed to store."""
    query = select(func.count()).where(Snapshot.vm_id == vm_id, Snapshot.status != FAILED)
    return int(await session.scalar(query) or 0)


async def storing_snapshots(session: AsyncSession) -> list[Snapshot]:
    query = select(Snapshot).where(Snapshot.status == STORING).order_by(Snapshot.created_at)
    return list((await session.scalars(query)).all())


async def settle_snapshot(session: AsyncSession, snapshot_id: str, **values: object) -> bool:
    """Turn a snapshot still `storing` into stored or failed; False if it is not (any more)
    storing (deleted meanwhile). Conditional, so a late writer never revives a row."""
    result = await session.execute(
        update(Snapshot)
        .where(Snapshot.id == snapshot_id, Snapshot.status == STORING)
        .values(**values)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def list_routes(session: AsyncSession, vm_id: str) -> list[Route]:
    """Newest first."""
    result = await session.execute(
        select(Route).where(Route.vm_id == vm_id).order_by(Route.created_at.desc(), Route.id)
    )
    return list(result.scalars())


async def get_route(session: AsyncSession, route_id: str) -> Route | None:
    return await session.get(Route, route_id) if _storable(route_id) else None


async def route_by_subdomain(session: AsyncSession, subdomain: str) -> Route | None:
    if not _storable(subdomain):
        return None
    result = await session.execute(select(Route).where(Route.subdomain == subdomain))
    return result.scalar_one_or_none()


async def all_routes(session: AsyncSession) -> list[Route]:
    return list((await session.execute(select(Route))).scalars())
