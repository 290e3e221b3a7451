"""A test double of Firecracker's jailer, built to its documented CLI and operation
(firecracker's docs/jailer.md), which then execs the Firecracker double inside the jail.

Run as the "jailer binary" (see `launcher`):

    jailer --id ID --exec-file FILE --uid UID --gid GID [--chroot-base-dir DIR]
           [--cgroup-version 1|2] [--cgroup FILE=VALUE ...] [--parent-cgroup PATH]
           [--netns PATH] [--resource-limit RES=VALUE ...] [--daemonize] [--new-pid-ns]
           [-- FIRECRACKER ARGS]

What it does, as the jailer does:
- parses strictly like the jailer's parser: `--name value` only, unknown, duplicated and
  value-less arguments and missing required ones are errors (exit 1, the jailer's message);
- validates the id (letters, digits, hyphens, 1-64), the exec file (a file), the chroot base (a
  directory), uid/gid (u32), the cgroup version, the cgroup options and parent;
- builds <chroot base>/<exec file name>/<id>/root, copies the exec file into it (owned by
  uid/gid), sets the open-file limit (2048 unless told), creates the cgroup and enters it for
  real (from /proc/mounts, v1 or v2), joins the network namespace;
- chroots into the jail (a private mount namespace), creates /dev, /dev/net and /run (0700, the
  uid's) and /dev/net/tun, /dev/kvm, /dev/urandom owned by the uid, writes /<exec name>.pid;
- drops to uid/gid (no supplementary groups), clears the environment and execs
  /<exec name> --id ID --start-time-us T --start-time-cpu-us T --parent-cpu-time-us T ARGS.

One thing it does that the jailer does not: the Firecracker double is a Python program, so the
Python runtime and this repository (read-only) are bind-mounted into the jail, in the double's
private mount namespace only (never visible to the host, gone with the process). Nothing else of
the host is: every path Firecracker is given must resolve inside the jail, and the kernel checks
every open against the jail's uid, so a file hatchd forgot to place, or placed without access
for the uid, fails as it would under the real jailer.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import stat
import sys
import time
from pathlib import Path

from tests.support.fc_swagger import REPO, SWAGGER

VERSION = "1.17.0-double"

# name: (takes a value, may repeat, required, default)
ARGUMENTS: dict[str, tuple[bool, bool, bool, str | None]] = {
    "id": (True, False, True, None),
    "exec-file": (True, False, True, None),
    "uid": (True, False, True, None),
    "gid": (True, False, True, None),
    "chroot-base-dir": (True, False, False, "/srv/jailer"),
    "netns": (True, False, False, None),
    "daemonize": (False, False, False, None),
    "new-pid-ns": (False, False, False, None),
    "cgroup": (True, True, False, None),
    "resource-limit": (True, True, False, None),
    "cgroup-version": (True, False, False, "1"),
    "parent-cgroup": (True, False, False, None),
    "version": (False, False, False, None),
}
FOLDERS = ("/", "/dev", "/dev/net", "/run")
DEVICES = (("/dev/net/tun", 10, 200), ("/dev/kvm", 10, 232))  # (path, major, minor)
URANDOM = ("/dev/urandom", 1, 9)
DEFAULT_NO_FILE = 2048
UNEXPECTED = "which wasn't expected, or isn't valid in this context."

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


class JailerError(Exception):
    """Printed as the jailer prints its errors; the process exits 1."""


Values = dict[str, str | list[str] | bool]


def parse(argv: list[str]) -> tuple[Values, list[str]]:
    """The jailer's arguments and those after `--` (for Firecracker)."""
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    values: Values = {}
    it = iter(argv)
    for arg in it:
        name = arg[2:] if arg.startswith("--") else arg
        if not arg.startswith("--") or name not in ARGUMENTS:
            raise JailerError(_parse_error(f"Found argument '{name}' {UNEXPECTED}"))
        takes_value, multiple, _, _ = ARGUMENTS[name]
        if name in values and not multiple:
            raise JailerError(_parse_error(f"The argument '{name}' was provided more than once."))
        if not takes_value:
            values[name] = True
            continue
        value = next(it, None)
        if value is None or value.startswith("--"):
            raise JailerError(
                _parse_error(f"The argument '{name}' requires a value, but none was supplied.")
            )
        if multiple:
            listed = values.setdefault(name, [])
            assert isinstance(listed, list)
            listed.append(value)
        else:
            values[name] = value
    if "version" in values:
        return values, extra
    for name, (_, _, required, default) in ARGUMENTS.items():
        if required and name not in values:
            raise JailerError(_parse_error(f"Argument '{name}' required, but not found."))
        if default is not None:
            values.setdefault(name, default)
    return values, extra


def _parse_error(message: str) -> str:
    return f"Failed to parse arguments: {message}"


def _single(values: Values, name: str) -> str:
    value = values[name]
    assert isinstance(value, str)
    return value


def _many(values: Values, name: str) -> list[str]:
    value = values.get(name, [])
    assert isinstance(value, list)
    return value


class Env:
    """What the jailer works out from its arguments before it touches anything."""

    def __init__(self, values: Values, extra: list[str]) -> None:
        self.id = _single(values, "id")
        if not 1 <= len(self.id) <= 64:
            raise JailerError(
                f"Invalid instance ID: Invalid len ({len(self.id)});  the length must be "
                "between 1 and 64"
            )
        for i, c in enumerate(self.id):
            if not (c == "-" or c.isalnum()):
                raise JailerError(f"Invalid instance ID: Invalid char ({c}) at position {i}")
        exec_file = _single(values, "exec-file")
        try:
            self.exec_file = Path(exec_file).resolve(strict=True)
        except OSError as exc:
            raise JailerError(f"Failed to canonicalize path {exec_file}: {exc.strerror}") from None
        if not self.exec_file.is_file():
            raise JailerError(f"{self.exec_file} is not a file")
        self.exec_name = self.exec_file.name
        base = _single(values, "chroot-base-dir")
        try:
            chroot_base = Path(base).resolve(strict=True)
        except OSError as exc:
            raise JailerError(f"Failed to canonicalize path {base}: {exc.strerror}") from None
        if not chroot_base.is_dir():
            raise JailerError(f"{chroot_base} is not a directory")
        self.chroot = chroot_base / self.exec_name / self.id / "root"
        self.uid = _u32(_single(values, "uid"), "Invalid uid")
        self.gid = _u32(_single(values, "gid"), "Invalid gid")
        self.netns = values.get("netns")
        self.daemonize = bool(values.get("daemonize"))
        self.new_pid_ns = bool(values.get("new-pid-ns"))
        parent = values.get("parent-cgroup", self.exec_name)
        assert isinstance(parent, str)
        if parent.startswith("/") or any(p in (".", "..") for p in parent.split("/")):
            raise JailerError(
                "Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'"
            )
        self.parent_cgroup = parent
        version = _single(values, "cgroup-version")
        if version not in ("1", "2"):
            raise JailerError(f"{version} is an invalid cgroup version specifier")
        self.cgroup_version = int(version)
        self.cgroups: list[tuple[str, str]] = []
        for option in _many(values, "cgroup"):
            parts = option.split("=")
            if len(parts) != 2 or not parts[1]:
                raise JailerError(f"Invalid format for cgroups: {option}")
            name = parts[0]
            if name.startswith("/") or any(p in (".", "..") for p in name.split("/")):
                raise JailerError(f"Cgroup invalid file: {option}")
            if len(name.split(".")) < 2:
                raise JailerError(f"Cgroup invalid file: {name}")
            self.cgroups.append((name, parts[1]))
        self.limits = {"no-file": DEFAULT_NO_FILE}
        for option in _many(values, "resource-limit"):
            name, sep, value = option.partition("=")
            if not sep:
                raise JailerError(f"Invalid format for resources limits: {option}")
            if not value.isdigit():
                raise JailerError(f"Invalid limit value for resource: {value}: not a number")
            if name not in ("fsize", "no-file"):
                raise JailerError(f"Invalid resource argument: {name}")
            self.limits[name] = int(value)
        self.extra = extra
        self.start_us = time.monotonic_ns() // 1000
        self.start_cpu_us = time.process_time_ns() // 1000

    # ---- the jailer's steps, in its order ----------------------------------------------

    def run(self) -> None:
        self.chroot.mkdir(parents=True, exist_ok=True)
        self._copy_exec_file()
        if isinstance(self.netns, str):
            self._join_netns(self.netns)
        self._set_limits()
        if self.cgroups or self.cgroup_version == 2:
            _cgroups(self)
        dev_null = os.open("/dev/null", os.O_RDWR) if self.daemonize else None
        self._enter_jail()
        for folder in FOLDERS:
            os.makedirs(folder, exist_ok=True)
            os.chmod(folder, 0o700)
            os.chown(folder, self.uid, self.gid)
        for path, major, minor in DEVICES:
            self._mknod(path, major, minor)
        try:
            self._mknod(*URANDOM)
        except JailerError as exc:
            print(f"Warning! Could not create /dev/urandom device inside jailer: {exc}.")
        if dev_null is not None:
            if os.fork():
                os._exit(0)
            os.setsid()
            if os.fork():
                os._exit(0)
            for fd in (0, 1, 2):
                os.dup2(dev_null, fd)
        exec_path = f"/{self.exec_name}"
        if self.new_pid_ns:
            if _libc.unshare(CLONE_NEWPID) != 0:
                raise JailerError(f"Failed cloning into a new child process: {_errno()}")
            child = os.fork()
            if child:
                _write_new(f"{exec_path}.pid", str(child))
                os._exit(0)
        else:
            _write_new(f"{exec_path}.pid", str(os.getpid()))
        self._exec(exec_path)

    def _copy_exec_file(self) -> None:
        dest = self.chroot / self.exec_name
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        mode = stat.S_IMODE(os.stat(self.exec_file).st_mode)
        try:
            fd = os.open(dest, flags, mode)
        except OSError as exc:
            raise JailerError(f"Failed to open {dest}: {exc.strerror}") from None
        try:
            if os.fstat(fd).st_nlink > 1:
                raise JailerError(f"Detected hard link at: {dest}")
            os.fchown(fd, self.uid, self.gid)
            with open(self.exec_file, "rb") as src, os.fdopen(os.dup(fd), "wb") as out:
                shutil.copyfileobj(src, out)
        finally:
            os.close(fd)

    @staticmethod
    def _join_netns(path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise JailerError(f"Failed to open file {path}: {exc.strerror}") from None
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise JailerError(f"Failed to join network namespace: netns: {_errno()}")
        finally:
            os.close(fd)

    def _set_limits(self) -> None:
        for name, value in self.limits.items():
            which = resource.RLIMIT_NOFILE if name == "no-file" else resource.RLIMIT_FSIZE
            try:
                resource.setrlimit(which, (value, value))
            except (OSError, ValueError) as exc:
                raise JailerError(f"Failed to set limit for resource: {exc}") from None

    def _enter_jail(self) -> None:
        """A private mount namespace (nothing mounted here reaches the host), the double's
        runtime bound in read-only, then chroot."""
        if _libc.unshare(CLONE_NEWNS) != 0:
            raise JailerError(f"Failed to unshare into new mount namespace: {_errno()}")
        if _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            raise JailerError(f"Failed to change the propagation type: {_errno()}")
        for source in _runtime_paths():
            _bind_read_only(source, self.chroot)
        for link in ("bin", "lib", "lib64", "sbin"):
            host = Path("/") / link
            if host.is_symlink() and not (self.chroot / link).exists():
                os.symlink(os.readlink(host), self.chroot / link)
        os.chroot(self.chroot)
        os.chdir("/")

    def _mknod(self, path: str, major: int, minor: int) -> None:
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(major, minor))
            os.chown(path, self.uid, self.gid)
        except OSError as exc:
            raise JailerError(
                f"Failed to create {path} via mknod inside the jail: {exc.strerror}"
            ) from None

    def _exec(self, exec_path: str) -> None:
        cpu_us = time.process_time_ns() // 1000
        argv = [
            exec_path,
            "--id",
            self.id,
            "--start-time-us",
            str(self.start_us),
            "--start-time-cpu-us",
            str(cpu_us),
            "--parent-cpu-time-us",
            str(cpu_us - self.start_cpu_us),
            *self.extra,
        ]
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)
        try:
            os.execve(exec_path, argv, {})
        except OSError as exc:
            raise JailerError(f"Failed to exec into Firecracker: {exc.strerror}") from None


def _u32(value: str, what: str) -> int:
    if not value.isdigit() or int(value) > 0xFFFF_FFFF:
        raise JailerError(f"{what}: {value}")
    return int(value)


def _errno() -> str:
    return os.strerror(ctypes.get_errno())


def _write_new(path: str, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise JailerError(f"Failed to open file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _runtime_paths() -> list[Path]:
    """What the Python Firecracker double needs to run: the interpreter, its libraries, this
    repository (its virtualenv, the double) and the swagger file's directory."""
    wanted = [Path("/usr"), Path(sys.base_prefix), REPO, SWAGGER.resolve().parent]
    for link in ("bin", "lib", "lib64", "sbin"):
        host = Path("/") / link
        if host.is_dir() and not host.is_symlink():
            wanted.append(host)
    paths: list[Path] = []
    for path in sorted(set(wanted)):
        if not any(path.is_relative_to(p) for p in paths):
            paths.append(path)
    return paths


def _bind_read_only(source: Path, chroot: Path) -> None:
    target = chroot
    for part in source.relative_to("/").parts:
        target = target / part
        if not target.exists():
            target.mkdir()
            target.chmod(0o755)  # passable by the jail's uid, whatever the caller's umask
    src, dst = os.fsencode(source), os.fsencode(target)
    if _libc.mount(src, dst, None, MS_BIND | MS_REC, None) != 0:
        raise JailerError(f"Failed to bind mount {source}: {_errno()}")
    if _libc.mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0:
        raise JailerError(f"Failed to make {target} read-only: {_errno()}")


# ---- cgroups, as the jailer makes them ------------------------------------------------


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, type, options) of /proc/mounts."""
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4:
            found.append((fields[1].replace("\\040", " "), fields[2], fields[3].split(",")))
    return found


def _write_value(path: Path, value: str) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError as exc:
        raise JailerError(f"Failed to write to {path}: {exc.strerror}") from None


def _cgroups(env: Env) -> None:
    pid = str(os.getpid())
    if env.cgroup_version == 2:
        unified = next((Path(m) for m, kind, _ in _mounts() if kind == "cgroup2"), None)
        if unified is None:
            raise JailerError("Hierarchy not found: cgroup2")
        if not env.cgroups:
            # No limits: the process joins the parent cgroup if it exists (and nothing else).
            parent = unified / env.parent_cgroup
            if parent.is_dir():
                _write_value(parent / "cgroup.procs", pid)
            return
        try:
            available = (unified / "cgroup.controllers").read_text().split()
        except OSError:
            available = []
        location = unified / env.parent_cgroup / env.id
        for name, _ in env.cgroups:
            if name.split(".")[0] not in available:
                raise JailerError(f"Controller {name.split('.')[0]} is unavailable")
        location.mkdir(parents=True, exist_ok=True)
        enabled: set[str] = set()
        for name, value in env.cgroups:
            controller = name.split(".")[0]
            if controller not in enabled:
                _enable_up(location.parent, controller)
                enabled.add(controller)
            _write_value(location / name, value)
        _write_value(location / "cgroup.procs", pid)
        return
    locations = set()
    for name, value in env.cgroups:
        controller = name.split(".")[0]
        base = next(
            (Path(m) for m, kind, opts in _mounts() if kind == "cgroup" and controller in opts),
            None,
        )
        if base is None:
            raise JailerError(f"Controller {controller} is unavailable")
        location = base / env.parent_cgroup / env.id
        location.mkdir(parents=True, exist_ok=True)
        _write_value(location / name, value)
        locations.add(location)
    for location in locations:
        _write_value(location / "tasks", pid)


def _enable_up(path: Path, controller: str) -> None:
    """+controller in cgroup.subtree_control from the top of the hierarchy down to path."""
    control = path / "cgroup.subtree_control"
    if not control.exists():
        return
    if path.parent != path:
        _enable_up(path.parent, controller)
    _write_value(control, f"+{controller}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    os.closerange(3, 1 << 16)  # as the jailer: nothing but stdio is inherited
    try:
        if "--help" in args or "-h" in args:
            print(f"Jailer v{VERSION}\n\nOptions: " + ", ".join(f"--{a}" for a in ARGUMENTS))
            return
        values, extra = parse(args)
        if "version" in values:
            print(f"Jailer v{VERSION}\n")
            return
        Env(values, extra).run()
    except JailerError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)


def launcher(directory: Path) -> Path:
    """An executable that runs this double with this interpreter: HATCH_FIRECRACKER_JAILER."""
    path = directory / "jailer"
    path.write_text(
        f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m tests.support.jailer_double "$@"\n'
    )
    path.chmod(0o755)
    return path


if __name__ == "__main__":
    main()
