"""Builds img_default from Debian packages only: the .deb files are downloaded and unpacked,
never installed into the host.

The image is Debian's cloud kernel (compressed for QEMU, plus the uncompressed ELF vmlinux that
Firecracker needs), an initramfs whose /init loads the virtio drivers and mounts the overlay
root, and a read-only ext4 root filesystem (busybox + dropbear + the guest agent, compiled here
from images/guest/agent/) made with `mkfs.ext4 -d`, so no loop device or mount is needed on the
host.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from hatchvm import private
from hatchvm.images.errors import ImageError

BUILDER_VERSION = 9
KERNEL_META = "linux-image-cloud-amd64"
# What the root filesystem is made of; their Depends/Pre-Depends (libc6, libcrypt1,
# libtomcrypt1, libtommath1, libgmp10, zlib1g, ...) are added from `apt-cache depends`.
ROOTFS_ROOTS = ["busybox-static", "dropbear-bin"]
# The modules the guest needs (ext4 and devtmpfs are built into the cloud kernel). The load
# order comes from each module's own `depends=` (virtio_ring before virtio in 6.1, for one).
# evdev + button deliver the ACPI power button (QMP system_powerdown) to acpid.
MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "overlay",
    "virtio_console",
    "evdev",
    "button",
]
# tsc=reliable: microvm has no HPET or ACPI PM timer to check the TSC against.
# The VMM driver adds the host TSC rate (tsc_early_khz=) under emulation: see vmm/clock.py.
BOOT_ARGS = "console=ttyS0 reboot=k panic=1 quiet tsc=reliable"
# The guest agent (src/hatchvm/agent/ is the host's side): a static C binary, so it needs
# nothing of the rootfs and starts in a millisecond. Compiled on the build host.
AGENT_SOURCE = ("agent", "hatch-agent.c")
AGENT_PATH = "usr/sbin/hatch-agent"
AGENT_CFLAGS = ["-static", "-Os", "-s", "-Wall", "-Wextra"]
AGENT_NAME = "hatch-agent 6"  # what the image's manifest records (and the agent's hello says)
MANIFEST = "manifest.json"
CURRENT = "current"  # in an image's directory: the version new VMs get
ARTIFACT_NAMES = {
    "kernel": "vmlinuz",
    "vmlinux": "vmlinux",
    "initrd": "initrd.img",
    "rootfs": "rootfs.ext4",
}

Progress = Callable[[str], None]


UNKNOWN_AGENT = "unknown"


class ImageBuildError(ImageError):
    """The build failed; the message says which step and why."""


@dataclass(frozen=True)
class ImageArtifacts:
    kernel: Path
    vmlinux: Path
    initrd: Path
    rootfs: Path
    boot_args: str
    kernel_version: str
    version: str  # a hash of the files' contents: what VMs and snapshots pin
    builder_version: int  # an older builder's image still boots its VMs, but is rebuilt
    # The guest agent the image runs: its name; None when the manifest says it has none;
    # UNKNOWN_AGENT when the manifest does not say (built before images recorded it).
    agent: str | None = None
    guest_sources: str | None = None  # guest_sources_hash() when built; None before it was kept

    @property
    def up_to_date(self) -> bool:
        """Built by this builder from these guest sources: an agent or init script changed
        without a BUILDER_VERSION bump is rebuilt too, never silently run in its old form."""
        return (
            self.builder_version == BUILDER_VERSION and self.guest_sources == guest_sources_hash()
        )


def _run(cmd: list[str], step: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(cmd, capture_output=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise ImageBuildError(f"{step} failed ({' '.join(cmd[:2])}): {_tail(result)}")
    return result  # type: ignore[no-any-return]


def _guest_file(*name: str) -> bytes:
    return resources.files("hatchvm.images").joinpath("guest", *name).read_bytes()


def guest_sources_hash(root: Traversable | None = None) -> str:
    """A hash of everything under images/guest/ (the agent's source, init's scripts): what
    goes into an image besides the packages. root: another such folder (tests)."""
    digest = hashlib.sha256()
    pending = [(root or resources.files("hatchvm.images").joinpath("guest"), "")]
    while pending:
        folder, prefix = pending.pop()
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            name = f"{prefix}{entry.name}"
            if entry.is_dir():
                if entry.name != "__pycache__":
                    pending.append((entry, f"{name}/"))
            else:
                data = entry.read_bytes()
                digest.update(f"{name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()[:16]


# ---- downloading ----------------------------------------------------------------------


_LISTS_MISSING = (
    "Unable to locate package",
    "has no installation candidate",
    "No packages found",
    "Can't select candidate",
    "Can't find a source to download",
)


class _Apt:
    """apt-get download / apt-cache against the host's package lists. `apt-get update` runs
    at most once per build, and only when a lookup fails because the lists lack a package."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.updated = False

    def _retry_after_update(self, result: subprocess.CompletedProcess[bytes]) -> bool:
        text = (result.stderr or b"") + (result.stdout or b"")
        text = text.decode(errors="replace")
        if self.updated or not any(marker in text for marker in _LISTS_MISSING):
            return False
        self.progress("package lists are missing or stale: apt-get update")
        _run(["apt-get", "update", "-q"], "apt-get update")
        self.updated = True
        return True

    def run(self, cmd: list[str], step: str, **kwargs: object) -> str:
        while True:
            result = subprocess.run(cmd, capture_output=True, **kwargs)  # type: ignore[call-overload]
            empty = cmd[0] == "apt-cache" and not result.stdout.strip()
            if result.returncode == 0 and not empty:
                return str(result.stdout.decode())
            if empty and not result.stderr:
                result.stderr = b"No packages found"
            if not self._retry_after_update(result):
                raise ImageBuildError(f"{step} failed: {_tail(result)}")

    def kernel_package(self) -> str:
        """The real kernel package behind the meta package (linux-image-6.1.0-N-cloud-amd64)."""
        out = self.run(["apt-cache", "depends", KERNEL_META], f"apt-cache depends {KERNEL_META}")
        for line in out.splitlines():
            line = line.strip()
            dep = line.removeprefix("Depends:").strip()
            if line.startswith("Depends:") and dep.startswith("linux-image-"):
                return dep
        raise ImageBuildError(f"{KERNEL_META} names no kernel package: {out.strip()[:200]}")

    def runtime_closure(self, roots: list[str]) -> list[str]:
        """roots plus everything they Depend/Pre-Depend on, recursively (no virtual packages)."""
        out = self.run(
            [
                "apt-cache",
                "depends",
                "--recurse",
                "--no-recommends",
                "--no-suggests",
                "--no-conflicts",
                "--no-breaks",
                "--no-replaces",
                "--no-enhances",
                *roots,
            ],
            "apt-cache depends",
        )
        names = {line.strip() for line in out.splitlines() if line and not line[0].isspace()}
        return sorted(n for n in names if not n.startswith("<"))

    def download(self, packages: list[str], cache: Path) -> dict[str, Path]:
        """apt-get download into cache; .debs already there are reused."""
        cache.mkdir(parents=True, exist_ok=True)
        found: dict[str, Path] = {}
        wanted = []
        for pkg in packages:
            hits = sorted(cache.glob(f"{pkg}_*.deb"), key=lambda p: p.stat().st_mtime)
            if hits:
                found[pkg] = hits[-1]
            else:
                wanted.append(pkg)
        if wanted:
            self.progress(f"downloading {', '.join(wanted)}")
            self.run(["apt-get", "download", "-q", *wanted], "apt-get download", cwd=cache)
            for pkg in wanted:
                hits = sorted(cache.glob(f"{pkg}_*.deb"), key=lambda p: p.stat().st_mtime)
                if not hits:
                    raise ImageBuildError(f"apt-get download gave no .deb for {pkg}")
                found[pkg] = hits[-1]
        return found


def _tail(result: subprocess.CompletedProcess[bytes], lines: int = 5) -> str:
    err = (result.stderr or b"").decode(errors="replace").strip()
    text = err or (result.stdout or b"").decode(errors="replace").strip()
    return " | ".join(text.splitlines()[-lines:]) or f"exit status {result.returncode}"


def _unpack(deb: Path, dest: Path) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(dest)], f"unpacking {deb.name}")


# ---- kernel ---------------------------------------------------------------------------


def extract_vmlinux(bzimage: Path, dest: Path) -> None:
    """Decompress the LZ4 payload of a bzImage into the ELF vmlinux Firecracker boots."""
    data = bzimage.read_bytes()
    setup_sects = data[0x1F1] or 4
    payload_offset = int.from_bytes(data[0x248:0x24C], "little")
    payload_length = int.from_bytes(data[0x24C:0x250], "little")
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    if payload[:4] != b"\x02\x21\x4c\x18":  # legacy LZ4 frame, as the kernel writes it
        raise ImageBuildError("kernel payload is not LZ4-compressed; cannot extract vmlinux")
    # The payload ends with the 4-byte uncompressed size, which lz4 would read as a frame.
    result = subprocess.run(
        ["lz4", "-d", "-c"], input=payload[:-4], capture_output=True, check=False
    )
    if not result.stdout.startswith(b"\x7fELF"):
        err = result.stderr.decode(errors="replace").strip()
        raise ImageBuildError(f"vmlinux extraction did not give an ELF file: {err}")
    dest.write_bytes(result.stdout)


def _build_initramfs(kernel_root: Path, kver: str, busybox: Path, dest: Path) -> list[str]:
    """Write the initramfs; returns the modules it loads, in order."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        (root / "lib/modules").mkdir(parents=True)
        shutil.copy2(busybox, root / "bin/busybox")
        for applet in (
            "sh",
            "mount",
            "umount",
            "insmod",
            "mkdir",
            "switch_root",
            "sleep",
            "usleep",
            "cat",
            "echo",
            "findfs",
            "poweroff",
        ):
            (root / "bin" / applet).symlink_to("busybox")
        found = find_modules(kernel_root / "lib/modules" / kver / "kernel")
        order = module_load_order(MODULES, found)
        for name in order:
            # busybox insmod reads plain .ko files only: compressed modules are unpacked here.
            (root / "lib/modules" / f"{name}.ko").write_bytes(module_bytes(found[name]))
        missing = {"virtio_mmio", "virtio_blk", "virtio_net", "overlay"} - set(order)
        if missing and not _builtin(kernel_root, kver, missing):
            raise ImageBuildError(f"kernel lacks modules {sorted(missing)}")
        (root / "lib/modules/order").write_text("\n".join(order) + "\n")
        init = root / "init"
        init.write_bytes(_guest_file("initramfs-init"))
        init.chmod(0o755)
        files = subprocess.run(
            ["find", ".", "-print0"], cwd=root, capture_output=True, check=True
        ).stdout
        archive = _run(
            ["cpio", "--null", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            "building the initramfs",
            cwd=root,
            input=files,
        ).stdout
    dest.write_bytes(gzip.compress(archive, compresslevel=6))
    return order


_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def find_modules(tree: Path) -> dict[str, Path]:
    """Module name -> file, for plain and compressed (.ko.xz/.ko.zst/.ko.gz) modules."""
    found: dict[str, Path] = {}
    for path in tree.rglob("*.ko*"):
        for suffix in _MODULE_SUFFIXES:
            if path.name.endswith(suffix):
                found.setdefault(path.name.removesuffix(suffix), path)
    return found


def module_bytes(path: Path) -> bytes:
    """The uncompressed module."""
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".zst"):
        return _run(["zstd", "-d", "-c", str(path)], f"decompressing {name}").stdout
    return path.read_bytes()


def module_depends(ko: Path) -> list[str]:
    """The `depends=` field of a module's .modinfo section."""
    data = module_bytes(ko)
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + 9 : data.index(b"\0", at + 9)].decode()
    return [d for d in value.split(",") if d]


def module_load_order(wanted: list[str], available: dict[str, Path]) -> list[str]:
    """Dependencies first, each module once; modules the kernel lacks (built in) are skipped."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order or name not in available:
            return
        if name in path:
            raise ImageBuildError(f"module dependency cycle: {' -> '.join((*path, name))}")
        for dep in module_depends(available[name]):
            visit(dep, (*path, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def _builtin(kernel_root: Path, kver: str, names: set[str]) -> bool:
    builtin = kernel_root / "lib/modules" / kver / "modules.builtin"
    text = builtin.read_text() if builtin.exists() else ""
    return all(f"/{n}.ko" in text for n in names)


# ---- root filesystem ------------------------------------------------------------------


def _build_rootfs(debs: list[Path], dest: Path, progress: Progress) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)
        for deb in debs:
            _unpack(deb, root)
        for junk in (
            "usr/share/doc",
            "usr/share/man",
            "usr/share/lintian",
            "usr/share/locale",
            "usr/lib/x86_64-linux-gnu/gconv",
            "usr/share/bug",
        ):
            shutil.rmtree(root / junk, ignore_errors=True)
        _install_busybox(root)
        _build_agent(root / AGENT_PATH)
        _write_etc(root)
        size_mib = _dir_mib(root) + 4
        progress(f"making the read-only root filesystem ({size_mib} MiB)")
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "hatchroot",
                "-O",
                "^has_journal",
                "-E",
                "root_owner=0:0",
                "-d",
                str(root),
                str(dest),
                f"{size_mib}M",
            ],
            "mkfs.ext4 of the root filesystem",
        )


def _install_busybox(root: Path) -> None:
    busybox = root / "bin/busybox"
    applets = _run([str(busybox), "--list-full"], "listing busybox applets").stdout.decode()
    for rel in applets.split():
        link = root / rel
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(busybox, link.parent))


def _build_agent(dest: Path) -> None:
    cc = shutil.which("gcc")
    if cc is None:
        raise ImageBuildError(
            "gcc is not installed: the guest agent is compiled from source "
            "(scripts/install installs gcc and libc6-dev)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / AGENT_SOURCE[-1]
        source.write_bytes(_guest_file(*AGENT_SOURCE))
        dest.parent.mkdir(parents=True, exist_ok=True)
        _run([cc, *AGENT_CFLAGS, "-o", str(dest), str(source)], "compiling the guest agent")
    dest.chmod(0o755)


def _write_etc(root: Path) -> None:
    etc = root / "etc"
    for sub in ("hatch", "acpi", "dropbear"):
        (etc / sub).mkdir(parents=True, exist_ok=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\ntty:x:5:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "shadow").chmod(0o600)
    (etc / "shells").write_text("/bin/sh\n")
    (etc / "inittab").write_bytes(_guest_file("inittab"))
    (etc / "acpid.conf").write_bytes(_guest_file("acpid.conf"))
    for name, path in (
        ("rc.boot", "hatch/rc.boot"),
        ("rc.ready", "hatch/rc.ready"),
        ("rc.user", "hatch/rc.user"),
        ("rc.shutdown", "hatch/rc.shutdown"),
        ("acpi-power", "acpi/power"),
    ):
        (etc / path).write_bytes(_guest_file(name))
        (etc / path).chmod(0o755)
    for d in ("root", "proc", "sys", "dev", "run", "tmp", "var/log", "mnt", "srv"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "root").chmod(0o700)
    (root / "tmp").chmod(0o1777)


def _dir_mib(root: Path) -> int:
    out = _run(["du", "-s", "--block-size=1M", str(root)], "measuring the rootfs").stdout
    return int(out.split()[0]) * 5 // 4 + 1


# ---- build and load -------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_default_image(
    image_dir: Path, cache_dir: Path, progress: Progress = print
) -> ImageArtifacts:
    """Build a version of the image beside the others in image_dir and make it current.

    Versions are never replaced in place: VMs and their snapshots pin the version they were
    made with (its files must not change under a snapshotted guest), and old versions are
    removed only once nothing refers to them (prune_versions)."""
    image_dir = image_dir.resolve()
    image_dir.mkdir(parents=True, exist_ok=True)
    apt = _Apt(progress)
    progress("resolving packages")
    kernel_pkg = apt.kernel_package()
    rootfs_pkgs = apt.runtime_closure(ROOTFS_ROOTS)
    debs = apt.download([kernel_pkg, *rootfs_pkgs], cache_dir)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=image_dir))
    try:
        # Guest files get the modes a guest expects (0o022), whatever umask the caller runs
        # with; what lands on the host is then made private explicitly.
        with private.umask(0o022):
            _build_into(staging, kernel_pkg, rootfs_pkgs, debs, progress)
        version = install_version(image_dir, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    artifacts = load_artifacts(image_dir / version)
    assert artifacts is not None
    progress(f"img_default {version} ready in {image_dir}")
    return artifacts


def _build_into(
    staging: Path,
    kernel_pkg: str,
    rootfs_pkgs: list[str],
    debs: dict[str, Path],
    progress: Progress,
) -> None:
    """Everything of the image, into staging (guest files with guest modes)."""
    with tempfile.TemporaryDirectory() as tmp:
        kernel_root = Path(tmp)
        progress(f"unpacking {kernel_pkg}")
        _unpack(debs[kernel_pkg], kernel_root)
        vmlinuz = next(iter(glob.glob(str(kernel_root / "boot/vmlinuz-*"))), None)
        if vmlinuz is None:
            raise ImageBuildError(f"{kernel_pkg} contains no /boot/vmlinuz-*")
        kver = Path(vmlinuz).name.removeprefix("vmlinuz-")
        shutil.copy2(vmlinuz, staging / ARTIFACT_NAMES["kernel"])
        progress("extracting the uncompressed vmlinux (LZ4 payload)")
        extract_vmlinux(staging / ARTIFACT_NAMES["kernel"], staging / ARTIFACT_NAMES["vmlinux"])
        progress("building the initramfs (virtio drivers, overlay root)")
        busybox_root = kernel_root / "bb"
        _unpack(debs["busybox-static"], busybox_root)
        modules = _build_initramfs(
            kernel_root, kver, busybox_root / "bin/busybox", staging / ARTIFACT_NAMES["initrd"]
        )
    progress("building the root filesystem (busybox, dropbear, the guest agent)")
    _build_rootfs([debs[p] for p in rootfs_pkgs], staging / ARTIFACT_NAMES["rootfs"], progress)
    progress("writing the manifest")
    files = {
        role: {
            "file": name,
            "size": (staging / name).stat().st_size,
            "sha256": _sha256(staging / name),
        }
        for role, name in ARTIFACT_NAMES.items()
    }
    manifest = {
        "builder_version": BUILDER_VERSION,
        "kernel_version": kver,
        "kernel_package": kernel_pkg,
        "packages": {p: debs[p].name for p in [kernel_pkg, *rootfs_pkgs]},
        "modules": modules,
        "boot_args": BOOT_ARGS,
        "agent": AGENT_NAME,
        "guest_sources": guest_sources_hash(),
        "files": files,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def content_version(manifest: dict[str, object]) -> str:
    """The version of an image: a hash of its files' checksums (same files, same version)."""
    files = manifest["files"]
    assert isinstance(files, dict)
    listing = sorted((role, info["sha256"]) for role, info in files.items())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def install_version(image_dir: Path, built: Path) -> str:
    """Move a complete build (a directory with its manifest) in as a version of the image and
    make it current; returns the version. The same content built again is the same version."""
    version = content_version(json.loads((built / MANIFEST).read_text()))
    target = image_dir / version
    for path in built.iterdir():
        path.chmod(0o400)  # read-only: VMs share these files
    built.chmod(0o700)
    if target.exists():
        shutil.rmtree(built)
    else:
        built.rename(target)
    _write_atomic(image_dir / CURRENT, version)
    return version


def current_version(image_dir: Path) -> str | None:
    """The version new VMs get (an image built by an older hatchvm is moved into place)."""
    if (image_dir / MANIFEST).exists():
        _adopt_flat_layout(image_dir)
    try:
        return (image_dir / CURRENT).read_text().strip() or None
    except FileNotFoundError:
        return None


def current_artifacts(image_dir: Path) -> ImageArtifacts | None:
    version = current_version(image_dir)
    return load_artifacts(image_dir / version) if version else None


def prune_versions(image_dir: Path, keep: set[str]) -> list[str]:
    """Remove the versions that are neither current nor in keep; returns them."""
    current = current_version(image_dir)
    gone = []
    for path in sorted(image_dir.iterdir()) if image_dir.is_dir() else []:
        if path.is_dir() and not path.name.startswith(".") and path.name not in keep | {current}:
            shutil.rmtree(path)
            gone.append(path.name)
    return gone


def _adopt_flat_layout(image_dir: Path) -> None:
    """Images before versions kept their files right in image_dir: make them a version."""
    staging = Path(tempfile.mkdtemp(prefix=".adopt-", dir=image_dir))
    for path in list(image_dir.iterdir()):
        if path.is_file() and path.name != CURRENT:
            path.rename(staging / path.name)
    install_version(image_dir, staging)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _agent_of(manifest: dict[str, object]) -> str | None:
    if "agent" not in manifest:
        return UNKNOWN_AGENT
    return str(manifest["agent"]) if manifest["agent"] else None


def load_artifacts(out_dir: Path) -> ImageArtifacts | None:
    """The artifacts of a complete build in out_dir, or None (missing or partial)."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        paths = {}
        for role, info in manifest["files"].items():
            path = out_dir.resolve() / info["file"]
            if path.stat().st_size != info["size"]:
                return None
            paths[role] = path
        return ImageArtifacts(
            kernel=paths["kernel"],
            vmlinux=paths["vmlinux"],
            initrd=paths["initrd"],
            rootfs=paths["rootfs"],
            boot_args=str(manifest["boot_args"]),
            kernel_version=str(manifest["kernel_version"]),
            version=content_version(manifest),
            builder_version=int(manifest["builder_version"]),
            agent=_agent_of(manifest),
            guest_sources=manifest.get("guest_sources"),
        )
    except (OSError, KeyError, ValueError, TypeError):
        return None
