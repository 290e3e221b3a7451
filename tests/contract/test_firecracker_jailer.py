"""The Firecracker driver under the jailer (the jailer double execs the Firecracker double chrooted
in the VM's jail, as the VM's uid): what is placed in the jail and with which access, what comes
back out of it, what is left when the VM is gone, the cgroup the jailer makes, and the jailer
double's own strictness (so the driver passing on it means something)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hatchvm.ids import new_id
from hatchvm.private import PRIVATE_UMASK
from hatchvm.vmm import acl, fc_jail
from hatchvm.vmm.base import BootSpec, RunningVM, VMMError, VMMRequestFailed
from hatchvm.vmm.cgroups import Limits, VMCgroups
from hatchvm.vmm.fc_jail import Jailer, JailError, jail_id
from hatchvm.vmm.firecracker import FirecrackerVMM
from hatchvm.vmm.process import process_ended
from tests.contract.conftest import JAIL_UIDS, _dummy_files
from tests.support import jailer_double
from tests.support.cgroups import cgroup_of, host_cgroups, limits_of, remove_parent
from tests.support.firecracker_double import SWAGGER, launcher

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the jailer chroots and changes uid: root only"),
    pytest.mark.skipif(not SWAGGER.exists(), reason=f"no swagger file at {SWAGGER}"),
]


@dataclasses.dataclass
class Setup:
    root: Path
    firecracker: str
    jailer_bin: str
    jails: Path
    files: dict[str, Path]
    cgroups: VMCgroups | None = None

    def jailer(self) -> Jailer:
        return Jailer(self.jailer_bin, self.firecracker, self.jails, JAIL_UIDS, self.cgroups)

    def vmm(self) -> FirecrackerVMM:
        return FirecrackerVMM(
            self.firecracker,
            self.root / "run",
            kvm_usable=False,
            cgroups=self.cgroups,
            start_timeout=60,
            jailer=self.jailer(),
        )

    def spec(self, vm_id: str, **changes: object) -> BootSpec:
        vm_dir = self.root / "vms" / vm_id
        vm_dir.mkdir(parents=True, exist_ok=True)
        disk = vm_dir / "disk.ext4"
        if not disk.exists():
            disk.write_bytes(b"\0" * 4096)
            disk.chmod(0o600)
        spec = BootSpec(
            vm_id=vm_id,
            vm_dir=vm_dir,
            kernel=self.files["kernel"],
            vmlinux=self.files["vmlinux"],
            initrd=self.files["initrd"],
            rootfs=self.files["rootfs"],
            disk=disk,
            vcpu_count=1,
            mem_mib=128,
            cmdline="console=ttyS0",
            mem_file=vm_dir / "mem",
        )
        return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    umask = os.umask(PRIVATE_UMASK)  # hatchd's: whatever the jail needs open, it sets so
    root = Path(tempfile.mkdtemp(prefix="hvj-", dir="/tmp"))
    jails = root / "jails"
    jails.mkdir(mode=0o700)
    made = Setup(
        root, str(launcher(root)), str(jailer_double.launcher(root)), jails, _dummy_files(root)
    )
    try:
        yield made
    finally:
        vmm = made.vmm()
        for vm_id in await vmm.processes(root / "vms"):
            await vmm.kill(vm_id, root / "vms" / vm_id)
        shutil.rmtree(root, ignore_errors=True)
        os.umask(umask)


def _uid_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
        if line.startswith("Gid:"):
            gid = int(line.split()[1])
    return uid, gid


def _same_file(a: Path | str, b: Path | str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


async def test_a_jailed_vm_runs_as_its_uid_in_its_jail_with_access_to_its_files_only(
    setup: Setup,
) -> None:
    vmm = setup.vmm()
    spec = setup.spec(new_id("vm"))
    pid = await vmm.boot(spec)
    jail = setup.jailer().jail(spec.vm_id)
    uid, gid = _uid_of(pid)
    assert uid == gid == jail.owner() and uid in range(JAIL_UIDS.base, JAIL_UIDS.base + 64)
    assert _same_file(f"/proc/{pid}/root", jail.root), "not chrooted into its jail"
    assert Path(f"/proc/{pid}/root/firecracker").exists()  # the jailer's copy of the binary
    # Hard links of hatchd's files, readable (the base read-only) by this uid alone.
    for role, source, perm in (
        ("kernel", setup.files["vmlinux"], acl.READ),
        ("initrd", setup.files["initrd"], acl.READ),
        ("base", setup.files["rootfs"], acl.READ),
        ("disk", spec.disk, acl.READ | acl.WRITE),
    ):
        placed = jail.host(fc_jail.IN_JAIL[role])
        assert _same_file(placed, source), role
        assert acl.users(source) == {uid: perm}, role
        assert os.stat(source).st_uid == 0, role
    assert stat.S_IMODE(os.stat(setup.files["rootfs"]).st_mode) & 0o222 == 0
    for name in ("console.fifo", "log.fifo", "metrics.fifo"):
        st = os.lstat(jail.host(f"/run/{name}"))
        assert stat.S_ISFIFO(st.st_mode) and st.st_uid == uid, name
    await vmm.resume(spec.vm_id, spec.vm_dir)
    await vmm.kill(spec.vm_id, spec.vm_dir)
    # The jail is gone, and with it every access the uid had.
    assert not jail.dir.exists()
    assert not vmm.sockets(spec.vm_dir).exists() and not vmm.sockets(spec.vm_dir).is_symlink()
    for source in (setup.files["vmlinux"], setup.files["rootfs"], spec.disk):
        assert acl.users(source) == {}
        assert stat.S_IMODE(os.stat(source).st_mode) in (0o400, 0o600)


async def test_vms_running_at_once_get_different_uids_and_share_the_read_only_base(
    setup: Setup,
) -> None:
    vmm = setup.vmm()
    first, second = setup.spec(new_id("vm")), setup.spec(new_id("vm"))
    pids = [await vmm.boot(first), await vmm.boot(second)]
    uids = {_uid_of(pid)[0] for pid in pids}
    assert len(uids) == 2
    assert acl.users(setup.files["rootfs"]) == dict.fromkeys(uids, acl.READ)
    await vmm.kill(first.vm_id, first.vm_dir)
    assert acl.users(setup.files["rootfs"]) == {_uid_of(pids[1])[0]: acl.READ}
    await vmm.kill(second.vm_id, second.vm_dir)


async def test_files_the_uid_may_not_read_or_that_are_outside_the_jail_fail_the_boot(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Positive controls: the jailed double really checks access as the uid and resolves
    paths inside the jail, so the driver passing means it placed everything right."""
    vmm = setup.vmm()
    spec = setup.spec(new_id("vm"))
    monkeypatch.setattr(acl, "grant", lambda *_args: None)
    with pytest.raises(VMMRequestFailed, match="Permission denied") as err:
        await vmm.boot(spec)
    assert err.value.op == "PUT /boot-source"
    assert await vmm.alive(spec.vm_id, spec.vm_dir) is None
    monkeypatch.undo()
    monkeypatch.setattr(Jailer, "place", lambda _self, _jail, _role, source, _w=False: str(source))
    with pytest.raises(VMMRequestFailed, match="No such file"):
        await vmm.boot(spec)
    assert not setup.jailer().jail(spec.vm_id).dir.exists()


async def test_a_snapshot_comes_out_of_the_jail_as_roots_and_restores_into_a_new_jail(
    setup: Setup,
) -> None:
    vmm = setup.vmm()
    spec = setup.spec(new_id("vm"))
    await vmm.boot(spec)
    await vmm.resume(spec.vm_id, spec.vm_dir)
    state = spec.vm_dir / "state"
    await vmm.snapshot(spec.vm_id, spec.vm_dir, state)
    assert spec.mem_file is not None
    for path in (state, spec.mem_file):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600), path
        assert st.st_nlink == 1 and acl.users(path) == {}
    assert not setup.jailer().jail(spec.vm_id).dir.exists()
    pid = await vmm.restore(spec, state)
    uid = _uid_of(pid)[0]
    jail = setup.jailer().jail(spec.vm_id)
    assert _same_file(jail.host("/snapshot/mem"), spec.mem_file)
    assert acl.users(spec.mem_file) == {uid: acl.READ}  # mapped privately: read is enough
    await vmm.resume(spec.vm_id, spec.vm_dir)
    await vmm.snapshot(spec.vm_id, spec.vm_dir, state)  # over the one it runs from
    assert acl.users(spec.mem_file) == {} and os.stat(spec.mem_file).st_uid == 0
    await vmm.restore(spec, state)
    await vmm.kill(spec.vm_id, spec.vm_dir)
    assert acl.users(spec.mem_file) == {} and acl.users(state) == {}


async def test_what_the_jailed_process_leaves_in_place_of_a_snapshot_is_refused(
    setup: Setup,
) -> None:
    """A jailed Firecracker owns its jail: a symlink (or a second name of a file hatchd linked
    in) where its snapshot should be never makes hatchd read or chmod another file."""
    jailer = setup.jailer()
    secret = setup.root / "secret"
    secret.write_text("host secret")
    secret.chmod(0o640)
    vm_dir = setup.root / "vms" / "vm_evil"
    vm_dir.mkdir(parents=True)
    jail = jailer.prepare("vm_evil", vm_dir)
    jailer.snapshot_targets(jail)
    os.symlink(secret, jail.host(fc_jail.NEW_STATE))
    with pytest.raises(JailError, match="not a regular file"):
        jailer.take_out(jail, fc_jail.NEW_STATE, vm_dir / "state")
    assert not (vm_dir / "state").exists() and not (vm_dir / "state").is_symlink()
    placed = jailer.place(jail, "base", setup.files["rootfs"])
    os.link(jail.host(placed), jail.host(fc_jail.NEW_MEM))
    with pytest.raises(JailError, match="not a file of its own"):
        jailer.take_out(jail, fc_jail.NEW_MEM, vm_dir / "mem")
    assert stat.S_IMODE(os.stat(setup.files["rootfs"]).st_mode) & 0o700 == 0o400
    assert os.stat(secret).st_mode & 0o777 == 0o640
    jailer.remove(jail)
    assert acl.users(setup.files["rootfs"]) == {}


async def test_a_jailed_process_that_plants_symlinks_in_its_jail_cannot_redirect_hatchd(
    setup: Setup,
) -> None:
    """What a compromised Firecracker could do, owning its jail: swap its /run for a link to
    another directory and make /snapshot a link to a host directory. hatchd still reaches its
    API through its own link, still recognises it by its root, and a snapshot is refused
    without touching the directory linked to (the same snapshot works without: the other
    tests)."""
    vmm = setup.vmm()
    spec = setup.spec(new_id("vm"))
    pid = await vmm.boot(spec)
    await vmm.resume(spec.vm_id, spec.vm_dir)
    jail = setup.jailer().jail(spec.vm_id)
    victim, decoy = setup.root / "victim", setup.root / "decoy"
    for made in (victim, decoy):
        made.mkdir()
        made.chmod(0o755)
    os.rename(jail.host("/run"), jail.host("/run.old"))
    os.symlink(decoy, jail.host("/run"))
    os.symlink(victim, jail.host("/snapshot"))
    assert await vmm.alive(spec.vm_id, spec.vm_dir) == pid
    assert await vmm.processes(setup.root / "vms") == {spec.vm_id: pid}
    assert await vmm.resume_if_paused(spec.vm_id, spec.vm_dir) is True  # its API answers
    with pytest.raises(VMMError, match="not a directory of its own") as err:
        await vmm.snapshot(spec.vm_id, spec.vm_dir, spec.vm_dir / "state")
    assert err.value.vm_id == spec.vm_id
    st = victim.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode), list(victim.iterdir())) == (0, 0o755, [])
    assert await vmm.alive(spec.vm_id, spec.vm_dir) == pid
    await vmm.kill(spec.vm_id, spec.vm_dir)
    assert not jail.dir.exists() and victim.is_dir() and decoy.is_dir()


async def test_a_restarted_daemon_finds_the_jailed_process_and_sweeps_dead_jails(
    setup: Setup,
) -> None:
    first = setup.vmm()
    alive, dead, stray = (setup.spec(new_id("vm")) for _ in range(3))
    pid = await first.boot(alive)
    dead_pid = await first.boot(dead)
    os.kill(dead_pid, 9)  # dies while no daemon watches
    assert await process_ended(dead_pid, 30)
    _reap(dead_pid)
    stray_pid = await first.boot(stray)
    (stray.vm_dir / "firecracker.pid").unlink()  # as if hatchd died before writing it
    second = setup.vmm()
    assert await second.processes(setup.root / "vms") == {alive.vm_id: pid}
    assert await second.alive(alive.vm_id, alive.vm_dir) == pid
    await second.settle([RunningVM(alive.vm_id, alive.vm_dir, 1, 128)])
    for gone in (dead, stray):
        assert not setup.jailer().jail(gone.vm_id).dir.exists()
        assert acl.users(gone.disk) == {}
    assert await process_ended(stray_pid, 30), "a process left in a swept jail is killed"
    _reap(stray_pid)
    assert setup.jailer().jail(alive.vm_id).dir.exists()
    await second.resume(alive.vm_id, alive.vm_dir)
    await second.kill(alive.vm_id, alive.vm_dir)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@pytest.fixture
def tap() -> Iterator[str]:
    """A TAP device made by root, as hatchd makes them (pytest runs in a fresh netns)."""
    name = "hvj" + new_id("t")[-8:]
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    yield name
    subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


def _attach_as(uid: int, tap: str) -> str:
    """What uid gets attaching to the TAP through /dev/net/tun: 'ok' or the error's name."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR)  # as a jail's node is: the uid may open it
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            flags = fc_jail.IFF_TAP | fc_jail.IFF_NO_PI
            fcntl.ioctl(fd, fc_jail.TUNSETIFF, struct.pack("16sH", tap.encode(), flags))
            os.write(write, b"ok")
        except OSError as exc:
            os.write(write, type(exc).__name__.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as answer:
        return answer.read()


async def test_a_jailed_vm_with_a_nic_opens_its_tap_as_its_uid_and_only_it_may(
    setup: Setup, tap: str
) -> None:
    other = JAIL_UIDS.base + 63
    assert _attach_as(other, tap) == "ok"  # the control: a TAP hatchd made has no owner
    vmm = setup.vmm()
    vm_id = new_id("vm")
    spec = setup.spec(vm_id, tap_name=tap, guest_mac="02:00:00:00:00:2b")
    pid = await vmm.boot(spec)
    uid = _uid_of(pid)[0]
    await vmm.resume(vm_id, spec.vm_dir)
    await vmm.snapshot(vm_id, spec.vm_dir, spec.vm_dir / "state")
    pid = await vmm.restore(spec, spec.vm_dir / "state")
    assert _uid_of(pid)[0] == uid  # its TAP reopened by the restored one
    await vmm.kill(vm_id, spec.vm_dir)
    assert _attach_as(other, tap) == "PermissionError"  # another jail's uid may not
    assert _attach_as(uid, tap) == "ok"
    spec = setup.spec(vm_id, tap_name="hvjnosuchtap", guest_mac="02:00:00:00:00:2b")
    with pytest.raises(VMMError, match="TAP hvjnosuchtap does not exist"):
        await vmm.boot(spec)


@pytest.fixture
def cgroups() -> Iterator[VMCgroups]:
    found = host_cgroups(f"hatchvm-jail-{os.getpid()}")
    if found is None:
        pytest.skip("no memory and cpu cgroup controllers here")
    found.prepare()
    yield found
    remove_parent(found)


async def test_the_jailer_puts_the_vm_in_a_cgroup_with_its_limits(
    setup: Setup, cgroups: VMCgroups
) -> None:
    setup.cgroups = cgroups
    vmm = setup.vmm()
    spec = setup.spec(new_id("vm"), vcpu_count=2, mem_mib=256)
    pid = await vmm.boot(spec)
    name = jail_id(spec.vm_id)
    assert cgroup_of(pid, cgroups) == [f"/{cgroups.parent}/{name}"] * len(cgroups.layout.roots)
    expected = Limits(memory_bytes=vmm.memory_footprint_mib(256) << 20, vcpus=2)
    assert limits_of(cgroups, name) == (expected.memory_bytes, 200_000, 100_000)
    await vmm.kill(spec.vm_id, spec.vm_dir)
    assert name not in cgroups.groups()


# ---- the jailer double holds its callers to the jailer's CLI ---------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--exec-file", "{fc}", "--uid", "1", "--gid", "1"], "Argument 'id' required"),
        (["--id", "a", "--exec-file", "{fc}", "--uid", "1"], "Argument 'gid' required"),
        (["--id", "a", "--bogus", "1"], "Found argument 'bogus' which wasn't expected"),
        (["--id", "a", "--id", "b"], "The argument 'id' was provided more than once"),
        (["--id", "--uid"], "The argument 'id' requires a value"),
        (["--id", "a_b", "--exec-file", "{fc}", "--uid", "1", "--gid", "1"], "Invalid char (_)"),
        (["--id", "a", "--exec-file", "{fc}", "--uid", "x", "--gid", "1"], "Invalid uid: x"),
        (
            ["--id", "a", "--exec-file", "{fc}", "--uid", "1", "--gid", "1", "--cgroup", "memmax"],
            "Invalid format for cgroups",
        ),
        (
            [
                *("--id", "a", "--exec-file", "{fc}", "--uid", "1", "--gid", "1"),
                *("--cgroup-version", "3"),
            ],
            "3 is an invalid cgroup version specifier",
        ),
        (
            [
                *("--id", "a", "--exec-file", "{fc}", "--uid", "1", "--gid", "1"),
                *("--parent-cgroup", "../up"),
            ],
            "Parent cgroup path is invalid",
        ),
        (["--id", "a", "--exec-file", "/no/such", "--uid", "1", "--gid", "1"], "canonicalize"),
    ],
)
def test_the_jailer_double_refuses_what_the_jailer_refuses(
    tmp_path: Path, args: list[str], message: str
) -> None:
    fc = launcher(tmp_path)
    argv = [a.replace("{fc}", str(fc)) for a in args]
    argv += ["--chroot-base-dir", str(tmp_path)] if "--exec-file" in argv else []
    done = subprocess.run(
        [str(jailer_double.launcher(tmp_path)), *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "firecracker" / "a").exists(), "nothing is built after a refusal"


async def test_a_broken_jailer_fails_the_start_clearly(setup: Setup) -> None:
    broken = setup.root / "broken-jailer"
    broken.write_text("#!/bin/sh\necho 'Failed to exec into Firecracker: oops' >&2\nexit 1\n")
    broken.chmod(0o755)
    setup.jailer_bin = str(broken)
    vmm = setup.vmm()
    spec = setup.spec(new_id("vm"))
    with pytest.raises(VMMError, match="oops") as err:
        await vmm.boot(spec)
    assert err.value.vm_id == spec.vm_id
    assert not setup.jailer().jail(spec.vm_id).dir.exists()
