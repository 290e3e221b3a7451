"""Warm templates: a create starts from a pre-booted, snapshotted guest of its shape.

A shape is what a guest's memory and devices depend on: image and image version, vCPUs,
memory, networking (whether it has a NIC), boot_args and the disk size (and HATCH_GUEST_DNS,
which the template's boot wrote into its resolv.conf). After the first cold
create of a shape, a template of it is built in the background (one at a time): a VM that no
user owns (not listed, in no quota, counted by host admission while it runs) boots with no
user_data, waits until its guest has settled (agent up, sshd listening), is captured (device
state; memory and disk moved, not copied) into templates/<key>/ and discarded. Its disk holds
nothing of any user's.

A later create of that shape runs the fork path from that frozen moment (core/forks.py): the
VM gets a copy of the template's memory file of its own, mapped shared as a booted VM's is (so
its snapshots capture device state only, and its wakes load only that: a memory mapped
privately would put the guest's RAM into every snapshot's state), the disk copied, the clock
set and the RNG reseeded, and the agent gives the guest the VM's own hostname (the one a cold
boot gives), address, MAC, machine id and SSH host keys before its NIC is plugged in; then it
writes the VM's user_data and SSH keys where a cold boot's disk has them and, with the NIC up,
runs the user_data once as init does at a boot. Any failure on the way leaves nothing behind
and the VM boots cold; the template is dropped (rebuilt after the next cold create). The key
holds the image version, so a rebuilt image makes new creates boot cold and build the new
version's template, which then retires the old one; a template whose version is not the
image's current one (or whose files are gone) is removed at start-up.

That memory copy is made ahead: each template keeps one spare copy (SPARE), made in the
background after the build and after each create takes it; a create that finds none (another
took it a moment ago) copies the template's memory then. Start-up removes spares (never
trusted from before a restart): the first create after it copies, and makes the next spare.

What a guest can tell: /proc/cmdline and the kernel log are the template's boot's (its
hostname and address there), and uptime counts from the template's boot.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from hatchvm.agent import files
from hatchvm.agent.exec import Command, Execution
from hatchvm.config import Settings
from hatchvm.core.forks import ForkService
from hatchvm.core.guest import STALL_S, translated
from hatchvm.core.vms import DISK_NAME, MEM_NAME, VMConfig, VMService, reason_of
from hatchvm.crashpoints import crashpoint
from hatchvm.db import repo
from hatchvm.db.models import VM
from hatchvm.errors import BackendUnavailable, InternalError
from hatchvm.ids import new_id
from hatchvm.images import registry
from hatchvm.images.builder import ImageArtifacts
from hatchvm.images.disk import GuestSeed, parse_user_data
from hatchvm.net.egress import Egress
from hatchvm.sparse import copy_sparse
from hatchvm.vmm.base import Feature

log = structlog.get_logger("hatchvm.core")

TEMPLATE_OWNER = ""  # the user_id of a template's VM: no user has it (ids are 1-128 characters)
TEMPLATES_DIR = "templates"  # under the data directory
SHAPE_FILE = "shape.json"  # written last: a template directory without it is not one
SPARE = "spare-mem"  # in a template's directory: a copy of its memory, the next create's
TAKEN = "taken-"  # + a VM id: a memory copy on its way into that VM's directory
NEEDED = {"identity", "files", "exec"}  # what the agent must do for a template to be used

# Run in a template's guest once its agent is up: until sshd listens and acpid runs (what
# rc.ready waits for), so the frozen moment is a settled guest. About 10 s at most.
SETTLE = r"""n=0
while [ $n -lt 1000 ]; do
  if pidof acpid > /dev/null && grep -qs ':0016 [0-9A-F:]* 0A ' /proc/net/tcp /proc/net/tcp6; then
    exit 0
  fi
  n=$((n + 1))
  usleep 10000
done
echo 'sshd or acpid did not start' >&2
exit 1
"""
# The VM's user_data, once, as init runs it at a boot (rc.user: its log and console output).
RUN_USER_DATA = "/etc/hatch/rc.user < /dev/null > /dev/null 2>&1 &"


@dataclass(frozen=True)
class Shape:
    image_id: str
    image_version: str
    vcpu_count: int
    mem_mib: int
    enable_network: bool
    boot_args: str
    disk_mib: int
    guest_dns: str  # HATCH_GUEST_DNS: the template's boot wrote it to /etc/resolv.conf

    @classmethod
    def of(cls, vm: VM, settings: Settings) -> Shape | None:
        if vm.image_version is None:
            return None
        return cls(
            image_id=vm.image_id,
            image_version=vm.image_version,
            vcpu_count=vm.vcpu_count,
            mem_mib=vm.mem_mib,
            enable_network=vm.enable_network,
            boot_args=vm.boot_args or "",
            disk_mib=settings.vm_disk_mib,
            guest_dns=settings.guest_dns,
        )

    @property
    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def same_but_version(self, other: Shape) -> bool:
        return asdict(self) | {"image_version": ""} == asdict(other) | {"image_version": ""}


class _Unusable(Exception):
    """The shape's guest cannot be a template (its agent lacks what it takes)."""


class _PutOff(Exception):
    """The host has no room for a template's VM now: a later create of its shape tries again."""


class TemplateService:
    def __init__(self, settings: Settings, vms: VMService) -> None:
        self._s = settings
        self.vms = vms
        self._forks: ForkService | None = None
        self.root = settings.data_dir / TEMPLATES_DIR
        self._pending: set[str] = set()  # shapes (keys) waiting for or in a build
        self._failed: set[str] = set()  # shapes whose build failed: not tried again until restart
        self._gate = asyncio.Lock()  # one build at a time
        self._tasks: set[asyncio.Task[None]] = set()
        self._sparing: set[str] = set()  # templates (keys) whose spare copy is being made

    async def enable(self, forks: ForkService) -> bool:
        """Take over VMService's creates (if the driver can fork guests with an agent)."""
        features = (await self.vms.vmm.capabilities()).features
        if Feature.FORK not in features or Feature.AGENT not in features:
            log.info("warm templates off: the vmm driver cannot fork guests with an agent")
            return False
        self._forks = forks
        self.vms.warm = self
        return True

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- start-up ----------------------------------------------------------------------

    async def recover(self) -> None:
        """At start-up, before reconciliation (templates on or off): what a daemon killed
        mid-build left goes, and templates no create can use any more (with templates off,
        all of them: their disk space is the host's again)."""
        async with self.vms.sessions() as session:
            rows = [vm for vm in await repo.list_vms(session) if vm.user_id == TEMPLATE_OWNER]
            images = {image.id: image.version for image in await repo.list_images(session)}
        for vm in rows:  # a build the daemon died in: its process, TAP and files go
            await self.vms.discard(vm)
            log.warning("interrupted template build discarded", vm_id=vm.id)
        await asyncio.to_thread(self._tidy, images)

    def _tidy(self, current: dict[str, str | None]) -> None:
        if not self.root.is_dir():
            return
        if not self._s.templates:
            _remove(self.root)
            return
        for path in self.root.iterdir():
            shape = _read_shape(path)
            if (
                shape is None
                or path.name != shape.key
                or current.get(shape.image_id) != shape.image_version
                or shape.guest_dns != self._s.guest_dns
            ):
                _remove(path)  # half-built, half-removed, of an old image version or DNS
            elif registry.pinned_artifacts(self._s, shape.image_id, shape.image_version) is None:
                _remove(path)
            else:  # copies of its memory: maybe from before a host reboot, made again
                for copy in path.iterdir():
                    if copy.name.startswith((SPARE, TAKEN)):
                        copy.unlink(missing_ok=True)

    # ---- creates -----------------------------------------------------------------------

    def _ready(self, shape: Shape) -> Path | None:
        path = self.root / shape.key
        return path if _read_shape(path) == shape else None

    async def start(self, vm: VM, image: ImageArtifacts) -> bool:
        shape = Shape.of(vm, self._s)
        source = self._ready(shape) if shape is not None else None
        forks = self._forks
        if shape is None or source is None or forks is None or vm.user_id == TEMPLATE_OWNER:
            return False
        seed = parse_user_data(vm.user_data)

        async def write_seed(child: VM) -> None:
            await self._write_seed(child, seed)

        async def run_user_data(child: VM) -> None:
            if seed.script:
                await self._exec(child, RUN_USER_DATA, "running its user_data")

        own_mem = source / f"{TAKEN}{vm.id}"
        try:
            await asyncio.to_thread(_take_memory_copy, source, own_mem)
            await forks.start_child(
                vm,
                image,
                source,
                before_link=write_seed,
                after_link=run_user_data,
                own_mem=own_mem,
            )
        except Exception as exc:
            log.warning(
                "start from a template failed, booting cold", vm_id=vm.id, reason=reason_of(exc)
            )
            self.vms.agents.detach(vm.id)
            await self.vms.teardown(vm)
            await asyncio.to_thread(_remove, source)  # built again after a cold create
            return False
        await asyncio.to_thread(_touch, source)  # recently used: the last to be evicted
        self._make_spare_later(source)  # for the next create
        log.info("vm started from a template", vm_id=vm.id, template=shape.key)
        return True

    def _make_spare_later(self, template: Path) -> None:
        """In the background, unless under way or there: the template's spare memory copy."""
        if template.name in self._sparing:
            return
        self._sparing.add(template.name)

        async def make() -> None:
            try:
                await asyncio.to_thread(_make_spare, template)
            except OSError as exc:  # the template removed meanwhile: a create copies then
                log.info("no spare memory copy", template=template.name, reason=str(exc))
            finally:
                self._sparing.discard(template.name)

        task = asyncio.create_task(make(), name=f"template-spare-{template.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_seed(self, vm: VM, seed: GuestSeed) -> None:
        """What a cold boot's disk holds of the VM's user_data (images/disk.py)."""
        wanted = []
        if seed.script:
            wanted.append(("/etc/hatch/user-data", seed.script, 0o755))
        if seed.ssh_keys:
            wanted.append(("/root/.ssh/authorized_keys", "\n".join(seed.ssh_keys) + "\n", 0o600))
        if not wanted:
            return
        with translated(vm.id):
            channel, _hello = await self.vms.agents.ready(vm.id, STALL_S)
            for path, text, mode in wanted:
                await files.upload(
                    channel, path, _chunks(text.encode()), mode=mode, parents=True, timeout=STALL_S
                )

    async def _exec(self, vm: VM, script: str, doing: str, timeout_s: float = 30) -> None:
        with translated(vm.id):
            channel, _hello = await self.vms.agents.ready(vm.id, STALL_S)
            command = Command(argv=("/bin/sh", "-c", script), timeout_s=timeout_s)
            execution = await Execution.start(channel, command, limit=4096, timeout=STALL_S)
            result = await execution.collect(4096)
        if result.exit.exit_code != 0:
            why = result.stderr.decode(errors="replace").strip()[-300:] or "no message"
            raise InternalError(f"{doing} in {vm.id} failed: {why}")

    # ---- builds ------------------------------------------------------------------------

    def booted(self, vm: VM) -> None:
        shape = Shape.of(vm, self._s)
        if shape is None or vm.user_id == TEMPLATE_OWNER:
            return
        key = shape.key
        if key in self._pending or key in self._failed or self._ready(shape) is not None:
            return
        if len(self._pending) >= self._s.max_templates:
            return  # shapes come faster than templates can be built: this one boots again
        self._pending.add(key)
        task = asyncio.create_task(self._build_in_turn(shape), name=f"template-{key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _build_in_turn(self, shape: Shape) -> None:
        try:
            async with self._gate:
                await self._build(shape)
        except asyncio.CancelledError:
            raise
        except _Unusable as exc:
            self._failed.add(shape.key)
            log.info("no template for this shape", template=shape.key, reason=str(exc))
        except _PutOff as exc:
            log.info("template build put off", template=shape.key, reason=str(exc))
        except Exception as exc:
            self._failed.add(shape.key)
            log.error("template build failed", template=shape.key, reason=reason_of(exc))
        finally:
            self._pending.discard(shape.key)

    async def _build(self, shape: Shape) -> None:
        image = await asyncio.to_thread(
            registry.pinned_artifacts, self._s, shape.image_id, shape.image_version
        )
        if image is None:
            raise _Unusable(f"image {shape.image_id} version {shape.image_version} is gone")
        cfg = VMConfig(
            image_id=shape.image_id,
            vcpu_count=shape.vcpu_count,
            mem_mib=shape.mem_mib,
            enable_network=shape.enable_network,
            egress=Egress.NONE,  # a template's guest reaches nothing
            user_data=None,
            boot_args=shape.boot_args or None,
        )
        vm_id = new_id("vm")
        final = self.root / shape.key
        build = self.root / f"{shape.key}.building"
        async with self.vms.locks.hold(vm_id):
            try:
                vm = await self.vms.reserve_unowned(TEMPLATE_OWNER, cfg, shape.image_version, vm_id)
            except BackendUnavailable as exc:  # no room on the host now
                raise _PutOff(exc.message) from None
            log.info("template building", template=shape.key, vm_id=vm_id, ip=vm.guest_ip)
            try:
                crashpoint("template.reserved")
                await asyncio.to_thread(self.vms.prepare_dir, vm)
                await self.vms.boot(vm, image)
                crashpoint("template.booted")
                await self._settle(vm)
                await asyncio.to_thread(_fresh_dir, build)
                vm_dir = self.vms.vm_dir(vm.id)
                await self.vms.vmm.capture(vm.id, vm_dir, build / "state")
                crashpoint("template.captured")
                await self.vms.vmm.kill(vm.id, vm_dir)
                await asyncio.to_thread(_store, vm_dir, build, final, shape)
                crashpoint("template.stored")
            finally:
                await self.vms.discard(vm)
                await asyncio.to_thread(_remove, build)
        await asyncio.to_thread(self._retire_others, shape)
        await asyncio.to_thread(self._evict)
        self._make_spare_later(final)
        log.info("template ready", template=shape.key)

    async def _settle(self, vm: VM) -> None:
        timeout = self._s.agent_ready_timeout
        with translated(vm.id):
            _channel, hello = await self.vms.agents.ready(vm.id, timeout)
        missing = NEEDED - set(hello.capabilities)
        if missing:
            raise _Unusable(f"its guest agent ({hello.agent}) cannot {', '.join(sorted(missing))}")
        await self._exec(vm, SETTLE, "settling the template")

    def _retire_others(self, shape: Shape) -> None:
        """Templates of the same shape for other image versions are never used again."""
        for path in self.root.iterdir():
            other = _read_shape(path)
            if other is not None and other != shape and other.same_but_version(shape):
                _remove(path)
                log.info("template of an older image version removed", template=path.name)

    def _evict(self) -> None:
        """Beyond HATCH_MAX_TEMPLATES, the least recently used (built or started from) go."""
        built = [path for path in self.root.iterdir() if _read_shape(path) is not None]
        built.sort(key=_last_used, reverse=True)
        for path in built[self._s.max_templates :]:
            _remove(path)
            log.info("least recently used template removed", template=path.name)


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _read_shape(path: Path) -> Shape | None:
    try:
        return Shape(**json.loads((path / SHAPE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _last_used(path: Path) -> float:
    try:
        return (path / SHAPE_FILE).stat().st_mtime
    except OSError:
        return 0.0


def _touch(path: Path) -> None:
    try:
        os.utime(path / SHAPE_FILE)
    except OSError:
        pass  # removed meanwhile: the VM runs from its own files


def _take_memory_copy(template: Path, dest: Path) -> None:
    """dest: a copy of the template's memory nobody else links; its spare if one is there
    (a rename: only one create can take it), else copied now."""
    try:
        os.rename(template / SPARE, dest)
    except FileNotFoundError:
        copy_sparse(template / "mem", dest)


def _make_spare(template: Path) -> None:
    if (template / SPARE).exists():
        return
    making = template / f"{SPARE}.making"
    copy_sparse(template / "mem", making)
    os.replace(making, template / SPARE)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _fresh_dir(path: Path) -> None:
    _remove(path)
    path.mkdir(mode=0o700, parents=True)


def _store(vm_dir: Path, build: Path, final: Path, shape: Shape) -> None:
    """The captured guest's memory and disk become the template's (the same names a fork's
    frozen moment has), its shape written last; then it takes the template's place."""
    os.replace(vm_dir / MEM_NAME, build / "mem")
    os.replace(vm_dir / DISK_NAME, build / "disk")
    (build / SHAPE_FILE).write_text(json.dumps(asdict(shape)))
    old = final.with_name(final.name + ".old")
    _remove(old)
    if final.exists():
        os.replace(final, old)
    os.replace(build, final)
    _remove(old)
