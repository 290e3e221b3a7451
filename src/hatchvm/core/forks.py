"""Forks: new VMs of the caller's running from one VM's memory and disk at one moment.

The moment is frozen into a work directory of this call: a running parent is paused only
while its device state is written and its memory and disk are copied (sparse), then runs on
(its clock resynced); a snapshotted one, or any stored snapshot, gives its files (copied from
the VM's own when they still equal it, else unpacked from the store). The parent's files are
never touched, so the children never see what it writes later. While a running parent is
captured, its children are already reserved, their TAPs made and their VMMs started, waiting for
the state (their memory file is the frozen one, filled in place as it is copied).

Every child hard-links the frozen memory file and maps it privately (copy-on-write: N children
share the pages they only read), gets its own sparse copy of the disk and of the device state,
and is restored with its NIC unplugged: its TAP is down on the host's side (the guest's own
link stays up, as its parent had it: a carrier going off and on again would make the guest's
kernel drop what it sends until it has noticed, and the first answer it gives would wait a
second for TCP to send it again). Its agent then sets its clock and reseeds its RNG (the
restore's SYNC), and, before the TAP comes up, gives it its own address, MAC, hostname,
SSH host keys and machine id: nothing leaves it under its parent's identity, and the bridge
lets its TAP send only from its own addresses anyway. A child whose guest cannot be re-made so
is discarded, and the whole fork fails: no two VMs share keys or RNG state.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import structlog

from hatchvm.agent.errors import AgentError, AgentRefused
from hatchvm.agent.exec import Command, Execution
from hatchvm.agent.identity import Address, set_identity
from hatchvm.agent.protocol import ErrorCode
from hatchvm.config import Settings
from hatchvm.core.guest import STALL_S, GuestService, translated
from hatchvm.core.snapshots import STATE_NAME, SnapshotService, latest_restorable
from hatchvm.core.states import Op, State, guard
from hatchvm.core.vms import (
    DISK_NAME,
    FORK_PENDING,
    MEM_NAME,
    MEM_PRIVATE,
    RESUME_DIR,
    VMConfig,
    VMService,
    reason_of,
)
from hatchvm.crashpoints import crashpoint
from hatchvm.db import repo
from hatchvm.db.models import VM, Snapshot
from hatchvm.errors import BadRequest, Conflict, HatchError, InternalError, NotFound
from hatchvm.ids import new_id
from hatchvm.images.builder import ImageArtifacts
from hatchvm.net.egress import Egress
from hatchvm.sparse import copy_sparse, make_holes
from hatchvm.vmm.base import Feature

log = structlog.get_logger("hatchvm.core")

# A step of making a child, with its agent ready (see start_child).
ChildStep = Callable[[VM], Awaitable[None]]

MAX_FORK_COUNT = 16  # children of one call
PARALLEL = 4  # children restored at once
WORK_DIR = "forks"  # under the data directory: one frozen moment per call, gone after it

# For an agent without "identity" (an image built before it), the same by a shell script, as
# root, its clock and RNG already resynced, the NIC still unplugged; as few processes as can be
# (each one costs under emulation): the address goes with the flush (the default route is put
# back). The host keys are removed before dropbear is killed: init respawns it at once, and
# its -R makes new keys (from the reseeded RNG) at the first connection, so no answer from
# port 22 ever shows the parent's keys, and nobody waits for key generation.
READDRESS = r"""set -e
echo "$NAME" > /proc/sys/kernel/hostname
echo "$NAME" > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 %s\n::1 localhost\n' "$NAME" > /etc/hosts
echo "$MACHINE_ID" > /etc/machine-id
if [ -n "$ADDR" ]; then
  ip link set dev eth0 address "$MAC"
  ip addr flush dev eth0
  ip addr add "$ADDR" dev eth0
  ip route replace default via "$GW" dev eth0
fi
rm -f /etc/dropbear/dropbear_*_host_key
killall dropbear 2>/dev/null || true
"""


class ForkService:
    def __init__(
        self,
        settings: Settings,
        vms: VMService,
        snapshots: SnapshotService,
        guest: GuestService,
    ) -> None:
        self._s = settings
        self.vms = vms
        self.snapshots = snapshots
        self.guest = guest
        self._watching: set[asyncio.Task[None]] = set()  # see _watch_files
        # Made at start-up, before any fork can run: what a daemon killed mid-fork left.
        shutil.rmtree(settings.data_dir / WORK_DIR, ignore_errors=True)

    async def fork_vm(self, user_id: str, vm_id: str, count: int) -> list[VM]:
        """count children of a running VM (paused only while it is captured) or of a
        snapshotted one (from its latest snapshot)."""
        parent = await self._check(user_id, vm_id, count)
        with self._work() as work:
            async with self.vms.locks.hold(vm_id):
                parent = await self.vms.get(user_id, vm_id)
                guard(Op.FORK, parent.state)
                if parent.state == State.RUNNING:
                    return await self._fork_running(user_id, parent, work, count)
                async with self.vms.sessions() as session:
                    snap = latest_restorable(await repo.list_snapshots(session, vm_id))
                if snap is None:
                    raise Conflict(f"vm {vm_id} has no snapshot to fork from")
                await self.snapshots.materialize(parent, snap, work)
            try:
                return await self._children(user_id, parent, work, count)
            finally:  # the children may link the parent's memory file: it gets its own
                self.snapshots.own_copy_later(parent.id)

    async def _fork_running(self, user_id: str, parent: VM, work: Path, count: int) -> list[VM]:
        """The parent (its lock held) is captured while its children start."""
        await asyncio.to_thread(_make_frozen_files, self.vms.vm_dir(parent.id), work)
        resync: asyncio.Task[None] | None = None

        async def freeze() -> None:
            nonlocal resync
            await self._capture(parent, work)
            # It stood paused: its clock is resynced (as a restored guest's) while the
            # children start.
            resync = asyncio.create_task(self._resync(parent))

        try:
            return await self._children(user_id, parent, work, count, freeze)
        finally:
            if resync is not None:
                await resync

    async def fork_snapshot(self, user_id: str, snapshot_id: str, count: int) -> list[VM]:
        """count children of a snapshot, whatever its VM does now (one still being stored:
        once stored, unless the VM's own files are it; a failed one never)."""
        snap: Snapshot = await self.snapshots.get(user_id, snapshot_id)
        parent = await self._check(user_id, snap.vm_id, count)
        with self._work() as work:
            async with self.vms.locks.hold(parent.id):
                parent = await self.vms.get(user_id, parent.id)
                snap = await self.snapshots.get(user_id, snapshot_id)
                await self.snapshots.materialize(parent, snap, work)
            try:
                return await self._children(user_id, parent, work, count)
            finally:  # the children may link the parent's memory file: it gets its own
                self.snapshots.own_copy_later(parent.id)

    async def _check(self, user_id: str, vm_id: str, count: int) -> VM:
        vm = await self.vms.get(user_id, vm_id)
        if not 1 <= count <= MAX_FORK_COUNT:
            raise BadRequest(f"count: must be 1 to {MAX_FORK_COUNT}")
        await self.vms.require(Feature.FORK, vm.id)
        await self.vms.require(Feature.AGENT, vm.id)
        # A child must be re-addressed and re-keyed by its agent before it may run.
        await self.guest.check_agent_image(vm, "fork")
        return vm

    def _work(self) -> _Frozen:
        base = self._s.data_dir / WORK_DIR
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        return _Frozen(base)

    # ---- the frozen moment -------------------------------------------------------------

    async def _capture(self, vm: VM, work: Path) -> None:
        """Pause, write the device state while memory and disk are copied, let it run on."""
        vm_dir = self.vms.vm_dir(vm.id)
        took = _Stopwatch()
        copied: dict[str, float] = {}

        async def copy_files() -> None:  # into the files its children already map
            copying = _Stopwatch()  # from the pause on, not from the call that makes it
            await asyncio.to_thread(copy_sparse, vm_dir / MEM_NAME, work / "mem", into=True)
            copying.lap("memory")
            await asyncio.to_thread(copy_sparse, vm_dir / DISK_NAME, work / "disk", into=True)
            copying.lap("disk")
            copied.update(copying.ms)

        try:
            await self.vms.vmm.capture(vm.id, vm_dir, work / "state", copy_files)
            crashpoint("fork.paused")  # the parent stands paused: start-up lets it run on
        except Exception as exc:
            await self._run_on(vm)
            await self._resync(vm)
            if isinstance(exc, HatchError):
                raise
            raise InternalError(f"capturing {vm.id} for a fork failed: {reason_of(exc)}") from exc
        await self._run_on(vm)
        log.info("vm captured for a fork", vm_id=vm.id, paused_ms=took.total_ms, **copied)

    async def _run_on(self, vm: VM) -> None:
        vm_dir = self.vms.vm_dir(vm.id)
        if not await self.vms.vmm.resume_if_paused(vm.id, vm_dir):
            raise InternalError(f"{vm.id} did not run on after its capture for a fork")

    async def _resync(self, vm: VM) -> None:
        try:
            warning = await self.vms.after_resume(vm)
            if warning is not None:
                await self.vms.update(vm.id, state_reason=warning)
        except Exception as exc:  # the fork goes on; the parent says why in its state_reason
            log.warning("parent not resynced after a fork", vm_id=vm.id, reason=reason_of(exc))

    # ---- the children ------------------------------------------------------------------

    async def _children(
        self,
        user_id: str,
        parent: VM,
        work: Path,
        count: int,
        freeze: Callable[[], Awaitable[None]] | None = None,
    ) -> list[VM]:
        """count children from work's files; freeze, if given, writes them (the children
        reserved and their VMMs starting meanwhile)."""
        image = await self.vms.image_files(parent)
        cfg = VMConfig(
            image_id=parent.image_id,
            vcpu_count=parent.vcpu_count,
            mem_mib=parent.mem_mib,
            enable_network=parent.enable_network,
            egress=Egress(parent.egress),
            user_data=parent.user_data,
            boot_args=parent.boot_args,
            restart=parent.restart,
        )
        async with AsyncExitStack() as locks:
            children: list[VM] = []
            frozen: asyncio.Task[None] | None = None
            try:
                for _ in range(count):
                    child_id = new_id("vm")
                    await locks.enter_async_context(self.vms.locks.hold(child_id))
                    children.append(
                        await self.vms.reserve(user_id, cfg, parent.image_version, child_id)
                    )
                crashpoint("fork.reserved")
                if freeze is not None:
                    frozen = asyncio.create_task(freeze())
                gate = asyncio.Semaphore(PARALLEL)

                async def start(child: VM) -> VM:
                    async with gate:
                        return await self.start_child(child, image, work, frozen=frozen)

                results = await asyncio.gather(
                    *(start(c) for c in children), return_exceptions=True
                )
                if frozen is not None:  # failed too if no child got as far as waiting for it
                    results += await asyncio.gather(frozen, return_exceptions=True)
                failures = [r for r in results if isinstance(r, BaseException)]
                if failures:
                    raise failures[0]
            except BaseException as exc:
                if frozen is not None and not frozen.done():  # the parent must run on first
                    await asyncio.gather(frozen, return_exceptions=True)
                for child in children:
                    await self.vms.discard(child)
                if isinstance(exc, HatchError):
                    raise
                reason = reason_of(exc)
                log.error("fork failed", vm_id=parent.id, reason=reason)
                raise InternalError(f"forking {parent.id} failed: {reason}") from exc
            started = [r for r in results if isinstance(r, VM)]
        log.info("vm forked", vm_id=parent.id, children=[c.id for c in started])
        for child in started:
            for hook in self.vms.create_hooks:
                await hook(child)
        return started

    async def start_child(
        self,
        child: VM,
        image: ImageArtifacts,
        work: Path,
        *,
        frozen: asyncio.Future[None] | None = None,
        before_link: ChildStep | None = None,
        after_link: ChildStep | None = None,
        own_mem: Path | None = None,
    ) -> VM:
        """Make child (its row reserved, its lock held) run from the frozen moment in work
        (mem, disk, state), re-made as itself. If frozen is given, work's files are being
        written until it is done (mem and disk already at their sizes): the child's VMM is
        started meanwhile. before_link runs once it is re-made, its NIC still unplugged;
        after_link once the NIC is plugged in (a warm template's create seeds the guest and
        starts its user_data there). own_mem: a copy of work's memory file that becomes the
        child's own (see _prepare_child)."""
        vm_dir = self.vms.vm_dir(child.id)
        took = _Stopwatch()
        await asyncio.to_thread(_prepare_child, vm_dir, work, own_mem)
        took.lap("files")
        await self.vms.attach_network(child, plugged=False)  # its parent's identity stays in
        took.lap("network")
        spec = self.vms.boot_spec(child, image)
        await self.vms.vmm.start_incoming(spec)
        took.lap("started")
        if frozen is not None:
            await asyncio.shield(frozen)  # shared by the siblings: one's cancel is not theirs
            took.lap("frozen")
        await asyncio.to_thread(_fill_child, vm_dir, work)
        await self.vms.vmm.restore(spec, vm_dir / RESUME_DIR / STATE_NAME)
        await self.vms.adopt(child, restored=True)
        # Its clock is set and its RNG reseeded while its agent re-makes it: nothing that
        # does needs the new randomness (the machine id comes from the host; dropbear makes
        # the SSH keys at the first connection, once the NIC is plugged in). Both requests
        # are sent while it is still paused (the first things its agent reads when it runs,
        # as a wake's sync is), so the guest does all of it in one go.
        remade = asyncio.gather(
            self.vms.after_resume(child), self._readdress(child), return_exceptions=True
        )
        try:
            await self.vms.vmm.resume(child.id, vm_dir)
        except BaseException:
            remade.cancel()
            await asyncio.gather(remade, return_exceptions=True)
            raise
        crashpoint("fork.child-resumed")  # still its parent's identity: never let it run on
        took.lap("restore")
        synced, readdressed = await remade
        # An agent 5 is still writing the child's files: its first answer said the network
        # and SSH are the child's own.
        files = readdressed if isinstance(readdressed, asyncio.Task) else None
        try:
            for outcome in (synced, readdressed):
                if isinstance(outcome, BaseException):
                    raise outcome
            if synced is not None:  # it would share its parent's RNG state: never let it run
                raise InternalError(f"the fork {child.id} could not be resynced: {synced}")
            took.lap("remade")
            if before_link is not None:
                await before_link(child)
            await self.vms.plug_network(child)
            if after_link is not None:
                await after_link(child)
            took.lap("linked")
            crashpoint("fork.child-remade")
            await asyncio.to_thread(shutil.rmtree, vm_dir / RESUME_DIR, True)
            await asyncio.to_thread((vm_dir / FORK_PENDING).unlink)
            log.info("fork child running", vm_id=child.id, **took.ms)
            running = await self.vms.update(
                child.id, state=State.RUNNING, state_reason=None, touch=True
            )
        except BaseException:
            if files is not None:
                files.cancel()
                await asyncio.gather(files, return_exceptions=True)
            raise
        if files is not None:
            self._watch_files(child.id, files)
        return running

    def _watch_files(self, vm_id: str, files: asyncio.Task[None]) -> None:
        """A child's agent writes its /etc/hostname, /etc/hosts and /etc/machine-id after
        it was plugged in (and before it runs anything hatchd asks next): a failure there
        is logged and shown in the child's state_reason."""

        async def watch() -> None:
            try:
                await files
            except AgentError as exc:
                reason = f"its /etc/hostname, /etc/hosts or /etc/machine-id: {exc}"
                try:
                    await self.vms.update(vm_id, state_reason=reason)
                except NotFound:
                    return  # deleted meanwhile: its agent went with it
                log.warning("fork child's files not written", vm_id=vm_id, reason=str(exc))

        task = asyncio.create_task(watch(), name=f"fork-files-{vm_id}")
        self._watching.add(task)
        task.add_done_callback(self._watching.discard)

    async def _readdress(self, child: VM) -> asyncio.Task[None] | None:
        """Its agent makes it its own: in one message when it can ("identity", agent 3:
        sent at once, with no hello first), else by a shell script (an image built before,
        whose agent answers that message UNSUPPORTED). From agent 5 on, the task that ends
        when its files are written too (see set_identity)."""
        name, machine_id = child.id.replace("_", "-"), secrets.token_hex(16)
        address = None
        if child.guest_ip and child.guest_mac and self.vms.net is not None:
            cidr = f"{child.guest_ip}/{self.vms.net.prefixlen}"
            net = self.vms.net
            address = Address(child.guest_mac, cidr, net.gateway, net.gateway_mac)
        try:
            with translated(child.id):
                channel = self.vms.agents.channel(child.id)
                try:
                    return await set_identity(channel, name, machine_id, address, STALL_S)
                except AgentRefused as exc:
                    if exc.code != ErrorCode.UNSUPPORTED:
                        raise
                channel, _ = await self.vms.agents.ready(child.id, STALL_S)
                env = {"NAME": name, "MACHINE_ID": machine_id, "ADDR": "", "MAC": "", "GW": ""}
                if address is not None:
                    env.update(ADDR=address.cidr, MAC=address.mac, GW=address.gateway)
                command = Command(
                    argv=("/bin/sh", "-c", READDRESS), env=tuple(env.items()), timeout_s=60
                )
                execution = await Execution.start(channel, command, limit=16 << 10, timeout=STALL_S)
                result = await execution.collect(16 << 10)
        except (AgentError, HatchError) as exc:
            message = exc.message if isinstance(exc, HatchError) else str(exc)
            raise InternalError(
                f"the fork {child.id} could not be re-addressed: {message}"
            ) from None
        if result.exit.exit_code != 0:
            why = result.stderr.decode(errors="replace").strip()[-300:] or "no message"
            raise InternalError(f"the fork {child.id} could not be re-addressed: {why}")
        return None


class _Stopwatch:
    """Milliseconds per step, for the log."""

    def __init__(self) -> None:
        self._start = self._last = time.monotonic()
        self.ms: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.ms[f"{name}_ms"] = round((now - self._last) * 1000, 1)
        self._last = now

    @property
    def total_ms(self) -> float:
        return round((time.monotonic() - self._start) * 1000, 1)


class _Frozen(tempfile.TemporaryDirectory):  # type: ignore[type-arg]
    """A work directory for one fork's frozen moment (Path on enter), removed after."""

    def __init__(self, base: Path) -> None:
        super().__init__(prefix="fork-", dir=base)

    def __enter__(self) -> Path:  # type: ignore[override]
        return Path(self.name)


def _make_frozen_files(parent_dir: Path, work: Path) -> None:
    """The frozen memory and disk at the parent's sizes, holes until it is captured."""
    for name, frozen in ((MEM_NAME, "mem"), (DISK_NAME, "disk")):
        make_holes(work / frozen, (parent_dir / name).stat().st_size)


def _prepare_child(vm_dir: Path, work: Path, own_mem: Path | None) -> None:
    """What the child's VMM opens as it starts: the frozen memory (shared by the siblings,
    never written: mapped privately), or own_mem, a copy of it that is the child's alone
    (mapped shared, as a booted VM's: its snapshots then hold device state only), and its
    disk at its size (filled by _fill_child)."""
    vm_dir.mkdir(parents=True, exist_ok=True)
    (vm_dir / FORK_PENDING).touch()
    if own_mem is None:
        (vm_dir / MEM_PRIVATE).touch()
        os.link(work / "mem", vm_dir / MEM_NAME)
    else:
        os.replace(own_mem, vm_dir / MEM_NAME)
    make_holes(vm_dir / DISK_NAME, (work / "disk").stat().st_size)
    (vm_dir / RESUME_DIR).mkdir(exist_ok=True)


def _fill_child(vm_dir: Path, work: Path) -> None:
    copy_sparse(work / "disk", vm_dir / DISK_NAME, into=True)
    copy_sparse(work / "state", vm_dir / RESUME_DIR / STATE_NAME)
