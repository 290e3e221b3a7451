"""The VM lifecycle. Only this module changes a VM's state; every change holds the VM's lock.

Each operation persists its intent first (a transitional state, the allocations), then acts,
then records the outcome, so a daemon killed half-way leaves a row that reconciliation
(core/reconcile.py) can resolve.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from hatchvm.agent.agents import Agents
from hatchvm.config import Settings
from hatchvm.core import quotas
from hatchvm.core.admission import HostAdmission, space_needed_mib
from hatchvm.core.console import Consoles
from hatchvm.core.locks import KeyedLocks
from hatchvm.core.network import GuestLink, HostNetwork
from hatchvm.core.states import Op, State, guard
from hatchvm.crashpoints import crashpoint
from hatchvm.db import repo
from hatchvm.db.models import VM, Image, utcnow
from hatchvm.errors import (
    BackendUnavailable,
    BadRequest,
    Conflict,
    InternalError,
    NotFound,
    NotSupported,
    QuotaExceeded,
)
from hatchvm.ids import DEFAULT_IMAGE_ID, new_id
from hatchvm.images import registry
from hatchvm.images.builder import ImageArtifacts
from hatchvm.images.disk import create_vm_disk, parse_user_data
from hatchvm.metrics import Metrics
from hatchvm.net import alloc
from hatchvm.net.egress import Egress
from hatchvm.vmm.base import VMM, BootSpec, Feature, VMMUnsupported

log = structlog.get_logger("hatchvm.core")

DISK_NAME = "disk.ext4"
MEM_NAME = "mem"  # guest RAM, file-backed: it is the memory image of a snapshot
RESUME_DIR = "resume"  # device state of the VM's latest snapshot, while its RAM is in MEM_NAME
# Present in a fork's child for its whole life: its MEM_NAME is a frozen memory image shared
# with its siblings (hard links), mapped privately and never written; its RAM (what it changed)
# goes into its snapshots' device state.
MEM_PRIVATE = "mem-private"
# Present while a fork's child is being made: until its agent has re-made it (new RNG state,
# address, keys), it must never run, so start-up reconciliation discards it.
FORK_PENDING = "fork-pending"

# Called with a VM just created, or about to be deleted (under its lock): other parts (snapshots,
# routes, the SSH gateway) follow the VM's life without VMService knowing them.
VMHook = Callable[[VM], Awaitable[None]]


@dataclass(frozen=True)
class VMConfig:
    """What a user asks for; validated by the API layer."""

    image_id: str
    vcpu_count: int
    mem_mib: int
    enable_network: bool
    egress: Egress
    user_data: str | None
    boot_args: str | None
    restart: str = "no"  # "no" | "on-failure"


class WarmStarts(Protocol):
    """Starting a new VM from a template of its shape instead of booting it."""

    async def start(self, vm: VM, image: ImageArtifacts) -> bool:
        """Make the reserved VM (its lock held) run from a template; False when there is
        none or it failed (nothing of the attempt is left: the caller boots it cold)."""
        ...

    def booted(self, vm: VM) -> None:
        """A VM of this shape was just booted cold."""
        ...


class VMService:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[Any],
        vmm: VMM,
        network: HostNetwork | None,
        consoles: Consoles,
        agents: Agents | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._s = settings
        self.metrics = metrics or Metrics()
        self.sessions = sessions
        self.vmm = vmm
        self.net = network
        self.consoles = consoles
        self.admission = HostAdmission(settings, sessions, vmm.memory_footprint_mib)
        self.agents = agents or Agents(settings.agent_timeout)
        self.locks = KeyedLocks()
        self._user_locks = KeyedLocks()
        self.delete_hooks: list[VMHook] = []
        # Before a deleted VM's process and files go (stores reading its files stop first).
        self.teardown_hooks: list[VMHook] = []
        self.create_hooks: list[VMHook] = []  # called with each VM once it runs
        # Called with a VM whose VMM process just started or was reattached (core/liveness).
        self.run_hooks: list[Callable[[VM], None]] = []
        self._cache: dict[str, VM] = {}
        self.warm: WarmStarts | None = None  # warm templates (core/templates.py), if enabled

    # ---- reads -------------------------------------------------------------------------

    async def get(self, user_id: str, vm_id: str) -> VM:
        async with self.sessions() as session:
            vm = await repo.get_vm(session, vm_id)
        if vm is None or vm.user_id != user_id:
            raise NotFound(f"vm {vm_id} not found")
        self._cache[vm_id] = vm
        return vm

    def cached(self, vm_id: str) -> VM | None:
        """The VM as last read or written by this service, without a database round trip
        (the proxy's hot path). Every state change goes through update() or invalidate()."""
        return self._cache.get(vm_id)

    def invalidate(self, vm_id: str) -> None:
        self._cache.pop(vm_id, None)

    async def load(self, vm_id: str) -> VM | None:
        """The VM whoever owns it (internal use: liveness, reconciliation)."""
        async with self.sessions() as session:
            return await repo.get_vm(session, vm_id)

    async def list(self, user_id: str) -> list[VM]:
        async with self.sessions() as session:
            return await repo.list_vms(session, user_id)

    async def require(self, feature: Feature, vm_id: str | None = None) -> None:
        """501 unless the VMM driver can do this (checked before anything is changed)."""
        try:
            (await self.vmm.capabilities()).require(feature, vm_id)
        except VMMUnsupported as exc:
            raise NotSupported(exc.message) from None

    @property
    def vms_dir(self) -> Path:
        return self._s.vms_dir

    def vm_dir(self, vm_id: str) -> Path:
        return self._s.vms_dir / vm_id

    # ---- create ------------------------------------------------------------------------

    async def create(self, user_id: str, cfg: VMConfig) -> VM:
        parse_user_data(cfg.user_data)  # refuse bad user_data before anything is made
        image = await self.load_image(cfg.image_id)
        if cfg.enable_network and self.net is None:
            raise BackendUnavailable("networking is not available on this host")
        vm_id = new_id("vm")
        # The VM's lock is held before its row exists: a delete that finds the row waits for
        # the boot to finish instead of racing it (which would leave a VMM with no row).
        async with self.locks.hold(vm_id):
            async with self._user_locks.hold(user_id), self.admission.lock:
                vm = await self._insert(vm_id, user_id, cfg, image.version)
            log.info("vm creating", vm_id=vm.id, user=user_id, ip=vm.guest_ip)
            crashpoint("create.inserted")
            started = time.monotonic()
            warm = False
            try:
                image_files = await self.image_files(vm)
                warm = self.warm is not None and await self.warm.start(vm, image_files)
                if not warm:
                    await asyncio.to_thread(self.prepare_dir, vm)
                    crashpoint("create.prepared")
                    await self.boot(vm, image_files)
            except Exception as exc:
                reason = reason_of(exc)
                log.error("vm create failed", vm_id=vm.id, reason=reason)
                await self.teardown(vm)
                await self.update(
                    vm.id,
                    state=State.ERROR,
                    state_reason=reason,
                    guest_ip=None,
                    guest_mac=None,
                    tap_name=None,
                    ssh_port=None,
                )
                raise InternalError(f"creating {vm.id} failed: {reason}") from exc
            vm = await self.update(vm.id, state=State.RUNNING, state_reason=None)
            took = time.monotonic() - started
            self.metrics.vm_created("template" if warm else "cold_boot", took)
            log.info("vm created", vm_id=vm.id, from_template=warm, took_s=round(took, 3))
        if not warm and self.warm is not None:
            self.warm.booted(vm)  # its shape may deserve a template
        for hook in self.create_hooks:
            await hook(vm)
        return vm

    async def reserve(
        self, user_id: str, cfg: VMConfig, image_version: str | None, vm_id: str
    ) -> VM:
        """A new VM's row (`starting`) with its addresses, within the user's quotas and the
        host's room, for a caller that makes the VM itself (a fork) holding its lock."""
        async with self._user_locks.hold(user_id), self.admission.lock:
            return await self._insert(vm_id, user_id, cfg, image_version)

    async def reserve_unowned(
        self, owner: str, cfg: VMConfig, image_version: str, vm_id: str
    ) -> VM:
        """A row for a VM no user owns (a template's, owner being no user's id): counted by
        host admission, not by any user's quotas, with addresses but no SSH port."""
        async with self.admission.lock:
            return await self._insert(vm_id, owner, cfg, image_version, owned=False)

    async def discard(self, vm: VM) -> None:
        """A VM that never became the user's (a fork that failed): everything of it goes,
        its row last. The caller holds its lock."""
        await self.teardown(vm)
        for hook in self.delete_hooks:
            await hook(vm)
        self.agents.detach(vm.id)
        async with self.sessions() as session, session.begin():
            row = await repo.get_vm(session, vm.id)
            if row is not None:
                await session.delete(row)
        self.invalidate(vm.id)

    async def load_image(self, image_id: str) -> Image:
        async with self.sessions() as session:
            image = await repo.get_image(session, image_id)
        if image is None:
            if image_id == DEFAULT_IMAGE_ID:
                raise BackendUnavailable(
                    "image img_default is not built yet (run: hatchvm image build)"
                )
            raise BadRequest(f"image_id: image {image_id} not found")
        return image

    async def image_files(self, vm: VM) -> ImageArtifacts:
        """The files of the image version the VM pins (a rebuilt image never changes them)."""
        version = vm.image_version or (await self.load_image(vm.image_id)).version
        files = None
        if version is not None:
            files = await asyncio.to_thread(
                registry.pinned_artifacts, self._s, vm.image_id, version
            )
        if files is None:
            raise InternalError(f"{vm.id} needs image {vm.image_id} version {version}: it is gone")
        return files

    async def _insert(
        self,
        vm_id: str,
        user_id: str,
        cfg: VMConfig,
        image_version: str | None,
        *,
        owned: bool = True,
    ) -> VM:
        """Check the quotas and the host's room, and persist the row with its allocations
        (retrying on a race). The caller holds the admission lock. A VM no user owns
        (owned=False) answers to no quota and gets no SSH port."""
        for _attempt in range(5):
            async with self.sessions() as session, session.begin():
                if owned:
                    usage = quotas.Usage(*await repo.user_totals(session, user_id))
                    quotas.check_create(self._s, usage, cfg.vcpu_count, cfg.mem_mib)
                space = cfg.mem_mib + self._s.vm_disk_mib
                await self.admission.check(session, None, cfg.mem_mib, space)
                vm = self._row(vm_id, user_id, cfg, image_version)
                if cfg.enable_network:
                    await self._allocate(session, vm)
                    if not owned:
                        vm.ssh_port = None
                session.add(vm)
                try:
                    await session.flush()
                except IntegrityError:
                    # Another daemon or request took the same address first: pick again.
                    await session.rollback()
                    continue
            return vm
        raise InternalError("could not allocate network addresses, try again")

    @staticmethod
    def _row(vm_id: str, user_id: str, cfg: VMConfig, image_version: str | None) -> VM:
        return VM(
            id=vm_id,
            user_id=user_id,
            image_id=cfg.image_id,
            image_version=image_version,
            state=State.STARTING,
            vcpu_count=cfg.vcpu_count,
            mem_mib=cfg.mem_mib,
            enable_network=cfg.enable_network,
            egress=cfg.egress.value,
            user_data=cfg.user_data,
            boot_args=cfg.boot_args,
            restart=cfg.restart,
        )

    async def _allocate(self, session: Any, vm: VM) -> None:
        ips, macs, ports = await repo.used_allocations(session)
        ip = alloc.first_free_ip(self._s.bridge_cidr, ips)
        port = alloc.first_free_port(self._s.ssh_port_min, self._s.ssh_port_max, ports)
        if ip is None:
            raise QuotaExceeded(f"no free guest address left in {self._s.bridge_cidr}")
        if port is None:
            raise QuotaExceeded("no free SSH port left")
        mac = alloc.random_mac()
        while mac in macs:
            mac = alloc.random_mac()
        vm.guest_ip, vm.guest_mac, vm.ssh_port = ip, mac, port
        vm.tap_name = alloc.tap_name(self._s.tap_prefix, vm.id)

    def space_needed_mib(self, vm: VM, fresh: bool = False) -> int:
        """Disk space the VM's memory file and disk may still take; fresh: both are about to be
        written anew beside the current ones (a restore that unpacks a snapshot)."""
        vm_dir = self.vm_dir(vm.id)
        files = {vm_dir / MEM_NAME: vm.mem_mib, vm_dir / DISK_NAME: self._s.vm_disk_mib}
        return sum(files.values()) if fresh else space_needed_mib(files)

    def prepare_dir(self, vm: VM) -> None:
        vm_dir = self.vm_dir(vm.id)
        vm_dir.mkdir(parents=True, exist_ok=True)
        create_vm_disk(
            vm_dir / DISK_NAME, self._s.vm_disk_mib, vm.id.replace("_", "-"), vm.user_data
        )

    # ---- boot / start ------------------------------------------------------------------

    def _cmdline(self, vm: VM, image: ImageArtifacts) -> str:
        parts = [image.boot_args, f"hatch.hostname={vm.id.replace('_', '-')}"]
        if vm.guest_ip and self.net is not None:
            parts += [
                f"hatch.ip={vm.guest_ip}/{self.net.prefixlen}",
                f"hatch.gw={self.net.gateway}",
                f"hatch.dns={self._s.guest_dns}",
            ]
        if vm.boot_args:
            parts.append(vm.boot_args)
        return " ".join(p for p in parts if p)

    def boot_spec(self, vm: VM, image: ImageArtifacts) -> BootSpec:
        return BootSpec(
            vm_id=vm.id,
            vm_dir=self.vm_dir(vm.id),
            kernel=image.kernel,
            initrd=image.initrd,
            rootfs=image.rootfs,
            disk=self.vm_dir(vm.id) / DISK_NAME,
            vcpu_count=vm.vcpu_count,
            mem_mib=vm.mem_mib,
            cmdline=self._cmdline(vm, image),
            tap_name=vm.tap_name,
            guest_mac=vm.guest_mac,
            mem_file=self.vm_dir(vm.id) / MEM_NAME,
            mem_shared=not (self.vm_dir(vm.id) / MEM_PRIVATE).exists(),
            vmlinux=image.vmlinux,
        )

    async def boot(self, vm: VM, image: ImageArtifacts) -> None:
        """Cold boot: fresh memory, so no earlier snapshot's RAM can be resumed from here."""
        await asyncio.to_thread(self.drop_memory, vm.id)
        await self.attach_network(vm)
        pid = await self.vmm.boot(self.boot_spec(vm, image))
        crashpoint("boot.vmm-started")
        await self.run(vm)
        crashpoint("boot.resumed")
        log.info("vm booted", vm_id=vm.id, pid=pid)

    async def adopt(self, vm: VM, *, restored: bool = False) -> None:
        """A VMM process of this VM runs (just started, or found at start-up): record its
        console, connect to its guest agent and watch its life."""
        vm_dir = self.vm_dir(vm.id)
        features = (await self.vmm.capabilities()).features
        if Feature.CONSOLE in features:
            await self.consoles.record(vm.id, vm_dir, self.vmm.console_socket(vm_dir))
        if Feature.AGENT in features:
            await self.agents.attach(vm.id, self.vmm.agent_socket(vm_dir), restored=restored)
        for hook in self.run_hooks:
            hook(vm)

    async def run(self, vm: VM, *, restored: bool = False) -> str | None:
        """The VM's VMM started paused: adopt it, then let the guest run (nothing it prints
        is missed). A guest restored from a snapshot is then resynced (after_resume) before
        this returns, so nothing reaches it first; the answer is a warning for its
        state_reason when that could not be done, else None. The sync is sent while the
        guest is still paused: it is the first thing the guest reads once it runs, and the
        wake saves a round trip."""
        await self.adopt(vm, restored=restored)
        sync = asyncio.create_task(self.after_resume(vm)) if restored else None
        try:
            await self.vmm.resume(vm.id, self.vm_dir(vm.id))
        except Exception:
            if sync is not None:
                sync.cancel()
            await self.vmm.kill(vm.id, self.vm_dir(vm.id))
            raise
        return await sync if sync is not None else None

    async def after_resume(self, vm: VM) -> str | None:
        """A guest that slept in a snapshot wakes with the clock and RNG state it was frozen
        with: the agent sets the host's time and reseeds the RNG. Bounded by
        HATCH_AGENT_TIMEOUT; a guest without an agent runs on, with the warning returned."""
        capabilities = await self.vmm.capabilities()
        if Feature.AGENT not in capabilities.features:
            driver = capabilities.name
            return f"clock not synced, RNG not reseeded: the {driver} driver has no guest agent"
        return await self.agents.after_resume(vm.id)

    def written_files(self, vm_id: str) -> list[Path]:
        """The files a VMM run of the VM writes into: its disk, and its memory file unless
        that is a fork's frozen image mapped privately (never written, it stays shared)."""
        vm_dir = self.vm_dir(vm_id)
        if (vm_dir / MEM_PRIVATE).exists():
            return [vm_dir / DISK_NAME]
        return [vm_dir / MEM_NAME, vm_dir / DISK_NAME]

    def drop_memory(self, vm_id: str) -> None:
        """Forget the VM's RAM file and resume state (after a stop, before a cold boot)."""
        vm_dir = self.vm_dir(vm_id)
        (vm_dir / MEM_NAME).unlink(missing_ok=True)
        shutil.rmtree(vm_dir / RESUME_DIR, ignore_errors=True)

    async def start(self, user_id: str, vm_id: str) -> VM:
        await self.get(user_id, vm_id)
        async with self.locks.hold(vm_id):
            return await self.start_locked(await self.get(user_id, vm_id))

    async def start_locked(self, vm: VM) -> VM:
        """Cold-boot a stopped VM, or one in error that still has its disk; the caller holds
        its lock (the API, or a wake)."""
        vm_id = vm.id
        guard(Op.START, vm.state)
        self.require_disk_if_error(vm)
        if not (self.vm_dir(vm_id) / DISK_NAME).exists():
            await self.update(vm_id, state=State.ERROR, state_reason="disk is missing")
            raise InternalError(f"cannot start {vm_id}: its disk is missing")
        image = await self.image_files(vm)
        async with self.admission.lock:
            space = await asyncio.to_thread(self.space_needed_mib, vm)
            await self.admission.admit(vm_id, vm.mem_mib, space)
            await self.update(vm_id, state=State.STARTING, state_reason=None)
        crashpoint("start.begun")
        try:
            await self.boot(vm, image)
        except Exception as exc:
            reason = reason_of(exc)
            log.error("vm start failed", vm_id=vm_id, reason=reason)
            await self._stop_process(vm)
            await self.update(vm_id, state=State.STOPPED, state_reason=reason)
            raise InternalError(f"starting {vm_id} failed: {reason}") from exc
        return await self.update(vm_id, state=State.RUNNING, touch=True)

    def require_disk_if_error(self, vm: VM) -> None:
        """A VM in error may be started or restored only while it has its disk (and with it
        its addresses): one torn down after a failed create or fork has nothing left."""
        if vm.state == State.ERROR and not (self.vm_dir(vm.id) / DISK_NAME).exists():
            why = f" ({vm.state_reason})" if vm.state_reason else ""
            raise Conflict(f"vm {vm.id} is in error{why} and has no disk left; delete it")

    # ---- stop / delete -----------------------------------------------------------------

    async def stop(self, user_id: str, vm_id: str) -> VM:
        await self.get(user_id, vm_id)
        async with self.locks.hold(vm_id):
            vm = await self.get(user_id, vm_id)
            guard(Op.STOP, vm.state)
            await self.update(vm_id, state=State.STOPPING)
            crashpoint("stop.begun")
            try:
                await self.vmm.stop(vm_id, self.vm_dir(vm_id), self._s.stop_timeout)
            except Exception as exc:
                # The process may still be alive: make sure, then record what happened.
                log.error("vm stop failed, killing", vm_id=vm_id, reason=reason_of(exc))
                await self.vmm.kill(vm_id, self.vm_dir(vm_id))
            crashpoint("stop.vmm-ended")
            await self.detach_network(vm)
            await asyncio.to_thread(self.drop_memory, vm_id)
            log.info("vm stopped", vm_id=vm_id)
            return await self.update(vm_id, state=State.STOPPED, state_reason=None, touch=True)

    async def delete(self, user_id: str, vm_id: str) -> None:
        await self.get(user_id, vm_id)
        async with self.locks.hold(vm_id):
            vm = await self.get(user_id, vm_id)
            guard(Op.DELETE, vm.state)
            for hook in self.teardown_hooks:
                await hook(vm)
            await self.teardown(vm)
            crashpoint("delete.torn-down")
            for hook in self.delete_hooks:
                await hook(vm)
            self.agents.detach(vm_id)
            async with self.sessions() as session, session.begin():
                row = await repo.get_vm(session, vm_id)
                if row is not None:
                    await session.delete(row)
            self.invalidate(vm_id)
            log.info("vm deleted", vm_id=vm_id)
        await registry.prune(self._s, self.sessions)  # the image version it pinned may go

    async def record_death(self, vm: VM, reason: str, last_exit: str) -> VM:
        """Its VMM process ended behind hatchd's back (the caller holds the VM's lock): its
        host resources go, and the VM is stopped, ready to be started or woken again."""
        await self._stop_process(vm)
        await asyncio.to_thread(self.drop_memory, vm.id)
        return await self.update(
            vm.id, state=State.STOPPED, state_reason=reason, last_exit=last_exit
        )

    async def _stop_process(self, vm: VM) -> None:
        await self.vmm.kill(vm.id, self.vm_dir(vm.id))
        await self.detach_network(vm)

    async def attach_network(self, vm: VM, plugged: bool = True) -> None:
        link = GuestLink.of(vm)
        if link is not None and self.net is not None:
            await self.net.attach(link, plugged)

    async def plug_network(self, vm: VM) -> None:
        """A VM attached unplugged (a fork's child): its frames reach the bridge from now on."""
        link = GuestLink.of(vm)
        if link is not None and self.net is not None:
            await self.net.plug(link)

    async def detach_network(self, vm: VM) -> None:
        link = GuestLink.of(vm)
        if link is not None and self.net is not None:
            await self.net.detach(link)

    async def teardown(self, vm: VM) -> None:
        """Idempotent: no process, no TAP, no files. Safe to re-run after a crash."""
        await self._stop_process(vm)
        await asyncio.to_thread(shutil.rmtree, self.vm_dir(vm.id), True)

    # ---- persistence -------------------------------------------------------------------

    async def update(
        self, vm_id: str, *, touch: bool = False, add: Sequence[object] = (), **fields: Any
    ) -> VM:
        """The one writer of VM state. `add`: rows committed in the same transaction (the
        snapshot a VM is now frozen in)."""
        async with self.sessions() as session, session.begin():
            vm = await repo.get_vm(session, vm_id)
            if vm is None:
                raise NotFound(f"vm {vm_id} not found")
            session.add_all(add)
            for name, value in fields.items():
                setattr(vm, name, value.value if isinstance(value, State) else value)
            vm.updated_at = utcnow()
            if touch:
                vm.last_activity_at = vm.updated_at
        self._cache[vm_id] = vm
        return vm

    async def touch_activity(self, vm_id: str) -> None:
        """Record use of the VM (proxy request, SSH connection) for the idle reaper."""
        async with self.sessions() as session, session.begin():
            vm = await repo.get_vm(session, vm_id)
            if vm is not None:
                vm.last_activity_at = utcnow()


def reason_of(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc) or type(exc).__name__
