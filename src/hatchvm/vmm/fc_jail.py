"""Firecracker under its jailer (HATCH_FIRECRACKER_JAILER): each VM's Firecracker runs as its own
uid and gid, chrooted into <chroot base>/<Firecracker's file name>/<jail id>/root, in a cgroup
the jailer makes with the VM's limits (its --cgroup options).

A jailed process owns its jail (the jailer gives it the jail's root), so hatchd never goes
through the jail to reach what it uses while the VM runs: the pipes are made beside root/ in the
jail's own directory, root's alone, and hard-linked into the jail's /run; the API socket
Firecracker creates there is linked out beside them once it appears (before any guest code has
run); a process is recognised by its root directory (kernel state it cannot change, unlike its
command line or its jail's contents); and what hatchd does inside a live jail (the snapshot
directory) walks it one component at a time, refusing symlinks.

The jailer builds nothing a VM needs: hatchd fills the jail before it runs. The files Firecracker
opens are hard links at fixed places (IN_JAIL), so the paths hatchd hands to the API are the same
for every VM and a snapshot's drive paths stay valid for its restore; the VM's uid gets access to
each through an ACL entry (acl.py): read for the shared, read-only image files and a snapshot being
loaded, read-write for its own disk. The files stay root's and nothing else about them changes.
The pipes (console, log, metrics) and the directory a snapshot is written to belong to the uid.

What the jailed Firecracker writes (a snapshot) is taken out of the jail into the VM's directory,
root's again with mode 0600, before anything trusts it: a jailed process owns its jail and could
leave a symlink or a link to another file there.

A jail lives exactly as long as its process: kill() removes it (ACL entries revoked first), and
start-up removes those of VMs that no longer run. Beside root/ a file only root can write records
which VM directory the jail belongs to, so a restarted hatchd finds its jailed processes.

    <chroot base>/<exec file name>/<jail id>/   root's, 0700
        vm_dir                     the VM directory it belongs to
        api.sock                   hard link of Firecracker's API socket (hatchd connects here)
        console.fifo, log.fifo, metrics.fifo   the pipes (the uid's), linked into root/run/
        root/                      the chroot: the uid's
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hatchvm.vmm import acl
from hatchvm.vmm.cgroups import Limits, VMCgroups

API_SOCKET = "/run/api.sock"  # Firecracker's --api-sock, inside the jail
RUN_DIR = "/run"  # its API socket and pipes
SNAPSHOT_DIR = "/snapshot"  # where it writes a snapshot (its own) and reads one (linked in)
# Where each file Firecracker opens is placed in the jail.
IN_JAIL = {
    "kernel": "/boot/vmlinux",
    "initrd": "/boot/initrd",
    "base": "/drives/base",
    "disk": "/drives/disk",
    "state": "/snapshot/state",
    "mem": "/snapshot/mem",
}
NEW_STATE = "/snapshot/new.state"
NEW_MEM = "/snapshot/new.mem"
MARKER = "vm_dir"  # beside root/: the VM directory this jail belongs to
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
TUNSETIFF, TUNSETOWNER, TUNSETGROUP = 0x400454CA, 0x400454CC, 0x400454CE
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
MAX_UID = 0xFFFF_FFFE  # (uid_t)-1 means "unchanged" to chown and setuid


class JailError(Exception):
    """A jail could not be built, filled, emptied or removed; the message says which."""


def jail_id(vm_id: str) -> str:
    """The jailer's --id: letters, digits and hyphens only (vm_ab12 -> vm-ab12)."""
    return vm_id.replace("_", "-")


@dataclass(frozen=True)
class UidRange:
    """The uids (and gids: the same numbers) jailed Firecrackers run as, one per running VM."""

    base: int
    count: int

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.base, self.base + self.count))

    def describe(self) -> str:
        return f"{self.base}-{self.base + self.count - 1}"


@dataclass(frozen=True)
class Jail:
    vm_id: str
    dir: Path  # <chroot base>/<exec file name>/<jail id>

    @property
    def root(self) -> Path:
        return self.dir / "root"

    def host(self, in_jail: str) -> Path:
        """Where a path Firecracker sees is on the host."""
        return self.root / in_jail.lstrip("/")

    def owner(self) -> int:
        """The jail's uid (the owner of its root, which the jailed process cannot change)."""
        return os.lstat(self.root).st_uid


def check_uid_range(uids: UidRange) -> None:
    """No existing user or group has an id in the range: a jailed Firecracker must own nothing
    on the host but its jail."""
    last = uids.base + uids.count - 1
    for user in pwd.getpwall():
        if uids.base <= user.pw_uid <= last:
            raise JailError(
                f"uid {user.pw_uid} of HATCH_FIRECRACKER_UID_BASE/_COUNT ({uids.describe()}) "
                f"belongs to user {user.pw_name!r}: choose a range no account uses"
            )
    for group in grp.getgrall():
        if uids.base <= group.gr_gid <= last:
            raise JailError(
                f"gid {group.gr_gid} of HATCH_FIRECRACKER_UID_BASE/_COUNT ({uids.describe()}) "
                f"belongs to group {group.gr_name!r}: choose a range no group uses"
            )


def check_jail_base(base: Path, data_dir: Path, uid: int) -> None:
    """The jails' directory can take hard links of the data dir's files (same filesystem) and
    POSIX ACLs (how a jail's uid gets access to them)."""
    if os.stat(base).st_dev != os.stat(data_dir).st_dev:
        raise JailError(
            f"{base} (HATCH_FIRECRACKER_CHROOT_BASE) is not on the filesystem of the data dir "
            f"{data_dir}: VM files are hard-linked into the jails"
        )
    fd, probe = tempfile.mkstemp(dir=base, prefix=".acl-probe-")
    os.close(fd)
    try:
        acl.grant(probe, uid, acl.READ)
        acl.revoke(probe, uid)
    except acl.ACLError as exc:
        raise JailError(f"{base}: {exc}") from None
    finally:
        os.unlink(probe)


def _is_ours(pid: int, jail: Jail) -> bool:
    """pid is alive and chrooted in this jail: its root directory is the jail's (the real
    jailer's pivot_root leaves a bind mount of the same directory there)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        theirs = os.stat(f"/proc/{pid}/root")
        ours = os.stat(jail.root)
    except OSError:
        return False
    return state != "Z" and (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def processes_in(jail: Jail) -> list[int]:
    """Every process chrooted in the jail (what a crash may have left without a pid file)."""
    try:
        ours = os.stat(jail.root)
    except OSError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                theirs = os.stat(entry / "root")
            except OSError:  # gone, or a zombie
                continue
            if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
                found.append(int(entry.name))
    return found


def give_tap(name: str, uid: int) -> None:
    """Make the uid (and gid) the TAP's owner: a jailed Firecracker can attach to any TAP
    without an owner through its jail's /dev/net/tun, but only to its own VM's one with."""
    try:
        socket.if_nametoindex(name)  # attaching to a missing one would create it
    except OSError:
        raise JailError(f"TAP {name} does not exist") from None
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise JailError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        fcntl.ioctl(fd, TUNSETOWNER, uid)
        fcntl.ioctl(fd, TUNSETGROUP, uid)
    except OSError as exc:
        raise JailError(f"cannot give TAP {name} to uid {uid}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _open_dir(jail: Jail, in_jail: str) -> int:
    """A directory of a live jail, walked from its root one component at a time: a symlink
    anywhere on the way (the jailed process may have left one) is refused, not followed."""
    fd = os.open(jail.root, _DIR)
    for part in (p for p in in_jail.split("/") if p):
        try:
            next_fd = os.open(part, _DIR, dir_fd=fd)
        except OSError as exc:
            raise JailError(
                f"the jail's {in_jail} is not a directory of its own ({exc.strerror})"
            ) from None
        finally:
            os.close(fd)
        fd = next_fd
    return fd


class Jailer:
    def __init__(
        self,
        jailer_bin: str,
        firecracker_bin: str,
        chroot_base: Path,
        uids: UidRange,
        cgroups: VMCgroups | None = None,
    ) -> None:
        self.jailer_bin = jailer_bin
        self.firecracker_bin = firecracker_bin
        self.chroot_base = chroot_base
        self.uids = uids
        self.cgroups = cgroups
        # The jailer copies Firecracker into the jail under its file name, and names the jail's
        # parent directory after it.
        self.exec_name = Path(firecracker_bin).resolve().name

    def describe(self) -> str:
        return f"jails under {self.chroot_base / self.exec_name}, uids {self.uids.describe()}"

    def jail(self, vm_id: str) -> Jail:
        return Jail(vm_id, self.chroot_base / self.exec_name / jail_id(vm_id))

    def jails(self) -> list[tuple[Jail, Path | None]]:
        """Every jail on disk with the VM directory it belongs to (None: unknown)."""
        found: list[tuple[Jail, Path | None]] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted((self.chroot_base / self.exec_name).iterdir()):
                vm_dir = self._vm_dir(entry)
                vm_id = vm_dir.name if vm_dir is not None else entry.name
                found.append((Jail(vm_id, entry), vm_dir))
        return found

    @staticmethod
    def _vm_dir(jail_dir: Path) -> Path | None:
        try:
            return Path((jail_dir / MARKER).read_text())
        except OSError:
            return None

    def is_ours(self, pid: int, vm_id: str) -> bool:
        return _is_ours(pid, self.jail(vm_id))

    # ---- building a jail ---------------------------------------------------------------

    def prepare(self, vm_id: str, vm_dir: Path) -> Jail:
        """An empty jail for the VM with a free uid (one left behind is removed first)."""
        jail = self.jail(vm_id)
        self.remove(jail)
        uid = self._free_uid()
        try:
            jail.dir.mkdir(mode=0o700, parents=True)
            (jail.dir / MARKER).write_text(str(vm_dir))
            jail.root.mkdir(mode=0o700)
            os.chown(jail.root, uid, uid)  # the jailer does it too; here it claims the uid now
            self._own_dir(jail, RUN_DIR)
        except OSError as exc:
            raise JailError(f"cannot build the jail {jail.root}: {exc.strerror}") from None
        return jail

    def _free_uid(self) -> int:
        used = set()
        for jail, _ in self.jails():
            with contextlib.suppress(OSError):
                used.add(jail.owner())
        for uid in self.uids:
            if uid not in used:
                return uid
        raise JailError(
            f"all {self.uids.count} uids of HATCH_FIRECRACKER_UID_BASE/_COUNT "
            f"({self.uids.describe()}) are taken by running VMs"
        )

    def _own_dir(self, jail: Jail, in_jail: str) -> Path:
        """A directory of the jail that belongs to its uid (mode 0700)."""
        path = jail.host(in_jail)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        uid = jail.owner()
        os.chown(path, uid, uid)
        return path

    def make_fifo(self, jail: Jail, name: str) -> str:
        """A named pipe beside the jail's root, the uid's, linked into its /run; its path in
        the jail."""
        path = jail.dir / name
        os.mkfifo(path, 0o600)
        uid = jail.owner()
        os.chown(path, uid, uid)
        os.link(path, jail.host(f"{RUN_DIR}/{name}"))
        return f"{RUN_DIR}/{name}"

    def link_api_socket(self, jail: Jail) -> None:
        """Link the API socket Firecracker created in the jail out beside the pipes, where
        hatchd connects to it (called as soon as it appears: no guest code has run yet)."""
        name = API_SOCKET.rsplit("/", 1)[1]
        dest = jail.dir / name
        fd = _open_dir(jail, RUN_DIR)
        try:
            dest.unlink(missing_ok=True)
            os.link(name, dest, src_dir_fd=fd, follow_symlinks=False)
        except OSError as exc:
            raise JailError(f"cannot link the jail's API socket out: {exc.strerror}") from None
        finally:
            os.close(fd)
        if not stat.S_ISSOCK(os.lstat(dest).st_mode):
            dest.unlink()
            raise JailError(f"the jail's {API_SOCKET} is not a socket")

    def place(self, jail: Jail, role: str, source: Path, writable: bool = False) -> str:
        """Put source in the jail where Firecracker looks for role (a hard link; a copy of a
        read-only file if the jail is on another filesystem: a writable one must be the file
        itself), give the uid read (and write) access; its path in the jail."""
        in_jail = IN_JAIL[role]
        dest = jail.host(in_jail)
        try:
            parent = dest.parent
            parent.mkdir(parents=True, exist_ok=True)
            if parent.stat().st_uid == 0:  # not one of the uid's own directories
                parent.chmod(0o711)  # passable by the uid; explicit: hatchd's umask is 077
            dest.unlink(missing_ok=True)
            try:
                os.link(source, dest)
            except OSError as exc:
                if exc.errno != errno.EXDEV or writable:
                    raise
                shutil.copyfile(source, dest)
                dest.chmod(0o400)
        except OSError as exc:
            raise JailError(f"cannot place {source} in the jail: {exc.strerror}") from None
        try:
            acl.grant(dest, jail.owner(), acl.READ | acl.WRITE if writable else acl.READ)
        except acl.ACLError as exc:
            raise JailError(str(exc)) from None
        return in_jail

    def snapshot_targets(self, jail: Jail) -> tuple[str, str]:
        """Where the jailed Firecracker writes a snapshot: (state, memory), in the jail (its
        /snapshot, made the uid's; the jail is live, so nothing there is followed)."""
        name = SNAPSHOT_DIR.strip("/")
        uid = jail.owner()
        root = _open_dir(jail, "/")
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=root)
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=root)
        except OSError as exc:
            raise JailError(
                f"the jail's {SNAPSHOT_DIR} is not a directory of its own ({exc.strerror})"
            ) from None
        finally:
            os.close(root)
        try:
            os.fchown(fd, uid, uid)
            os.fchmod(fd, 0o700)
            for path in (NEW_STATE, NEW_MEM):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path.rsplit("/", 1)[1], dir_fd=fd)
        finally:
            os.close(fd)
        return NEW_STATE, NEW_MEM

    def take_out(self, jail: Jail, in_jail: str, dest: Path) -> None:
        """Move a file the jailed Firecracker wrote to dest (out of its reach), root's with mode
        0600. Anything but a regular file of its own (a symlink, a directory, a second name of
        a file hatchd linked in) is refused and removed."""
        where, name = in_jail.rsplit("/", 1)
        fd = _open_dir(jail, where)
        try:
            os.replace(name, dest, src_dir_fd=fd)
        except OSError as exc:
            raise JailError(f"cannot take {in_jail} out of the jail: {exc.strerror}") from None
        finally:
            os.close(fd)
        try:
            fd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            dest.unlink(missing_ok=True)
            raise JailError(f"the jail's {in_jail} is not a regular file (removed)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                _remove_any(dest)
                raise JailError(f"the jail's {in_jail} is not a file of its own (removed)")
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o600)
            with contextlib.suppress(OSError):
                os.removexattr(fd, acl.XATTR)
        finally:
            os.close(fd)

    # ---- running it --------------------------------------------------------------------

    def command(self, jail: Jail, limits: Limits | None, firecracker_args: list[str]) -> list[str]:
        """The jailer's command line: Firecracker as the jail's uid and gid, chrooted, in a
        cgroup with these limits (none without cgroups)."""
        uid = str(jail.owner())
        cmd = [
            self.jailer_bin,
            "--id",
            jail_id(jail.vm_id),
            "--exec-file",
            self.firecracker_bin,
            "--uid",
            uid,
            "--gid",
            uid,
            "--chroot-base-dir",
            str(self.chroot_base),
        ]
        if self.cgroups is not None and limits is not None:
            cmd += ["--cgroup-version", str(self.cgroups.layout.version)]
            cmd += ["--parent-cgroup", self.cgroups.parent]
            for name, value in self.cgroups.properties(limits):
                cmd += ["--cgroup", f"{name}={value}"]
        return [*cmd, "--", *firecracker_args]

    # ---- removing it -------------------------------------------------------------------

    def remove(self, jail: Jail) -> None:
        """Kill whatever still runs in the jail (its Firecracker has normally ended already),
        take the uid's ACL entries off the files linked in, then remove the jail. Idempotent."""
        if not jail.dir.exists():
            return
        for pid in processes_in(jail):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            uid: int | None = jail.owner()
        except OSError:
            uid = None
        if uid is not None:
            for dirpath, _dirs, files in os.walk(jail.root):
                for name in files:
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError, acl.ACLError):
                        st = os.lstat(path)
                        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                            acl.revoke(path, uid)
        shutil.rmtree(jail.dir, ignore_errors=True)
        if jail.dir.exists():
            raise JailError(f"cannot remove the jail {jail.dir}")


def _remove_any(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
