"""The per-VM writable disk, and what user_data puts on it.

The disk is an ext4 file made with `mkfs.ext4 -d` (no loop mount). It holds the overlay's
`upper/` and `work/` directories; the guest mounts it over the read-only base, so everything the
guest writes persists across stop/start. It is pre-seeded with the hostname, the user_data
script and SSH keys.

user_data is one of:
- a shell script starting with `#!`: run at every boot. Lines `# ssh-authorized-key: <key>`
  add keys for root's SSH login;
- `#cloud-config` YAML with `ssh_authorized_keys` (list of keys) and `runcmd` (list of
  commands, each a string or an argv list), run at every boot as one script.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hatchvm.images.errors import DiskError, UserDataError

MAX_USER_DATA = 64 * 1024
# What a cloud-config may expand to (shlex quoting adds a little; YAML aliases could add
# gigabytes: `- &a <60 KiB>` then `- *a` a thousand times).
MAX_SEED = 4 * MAX_USER_DATA
MIN_DISK_MIB = 16
_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-", "sk-ssh-ed25519", "sk-ecdsa-sha2-")
_KEY_MARKER = "# ssh-authorized-key:"
_CLOUD_CONFIG_KEYS = {"ssh_authorized_keys", "runcmd"}


@dataclass(frozen=True)
class GuestSeed:
    script: str | None = None  # run at every boot
    ssh_keys: list[str] = field(default_factory=list)


def _check_key(key: str) -> str:
    key = key.strip()
    if "\n" in key or not key.startswith(_KEY_TYPES) or len(key.split()) < 2:
        raise UserDataError(f"user_data: not an SSH public key: {key[:40]!r}")
    return key


def _runcmd_script(commands: object) -> str:
    if not isinstance(commands, list):
        raise UserDataError("user_data: runcmd must be a list")
    lines = ["#!/bin/sh"]
    size = 0
    for cmd in commands:
        if isinstance(cmd, str):
            line = cmd
        elif isinstance(cmd, list) and all(isinstance(a, str) for a in cmd):
            line = shlex.join(cmd)
        else:
            raise UserDataError("user_data: runcmd entries must be strings or lists of strings")
        size += len(line) + 1
        if size > MAX_SEED:  # checked as it grows: aliases repeat one entry without limit
            raise UserDataError(f"user_data: runcmd expands to over {MAX_SEED // 1024} KiB")
        lines.append(line)
    return "\n".join(lines) + "\n"


def _parse_cloud_config(text: str) -> GuestSeed:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserDataError(f"user_data: invalid cloud-config YAML: {exc}") from None
    if data is None:
        return GuestSeed()
    if not isinstance(data, dict):
        raise UserDataError("user_data: cloud-config must be a YAML mapping")
    unknown = sorted(set(map(str, data)) - _CLOUD_CONFIG_KEYS)
    if unknown:
        raise UserDataError(
            f"user_data: unsupported cloud-config key {unknown[0]!r} "
            f"(supported: {', '.join(sorted(_CLOUD_CONFIG_KEYS))})"
        )
    keys = data.get("ssh_authorized_keys") or []
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise UserDataError("user_data: ssh_authorized_keys must be a list of strings")
    if sum(len(k) for k in keys) > MAX_SEED:
        raise UserDataError(f"user_data: ssh_authorized_keys expand to over {MAX_SEED // 1024} KiB")
    script = _runcmd_script(data["runcmd"]) if data.get("runcmd") else None
    return _checked_seed(GuestSeed(script=script, ssh_keys=[_check_key(k) for k in keys]))


def _checked_seed(seed: GuestSeed) -> GuestSeed:
    """What YAML made of user_data: its escapes can spell NULs and lone surrogates (which no
    file can hold), its aliases can multiply the text."""
    text = "\n".join([seed.script or "", *seed.ssh_keys])
    if "\x00" in text:
        raise UserDataError("user_data: must not contain NUL bytes")
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        message = "user_data: must not contain lone surrogates (\\ud800-\\udfff)"
        raise UserDataError(message) from None
    if size > MAX_SEED:
        raise UserDataError(f"user_data: cloud-config expands to over {MAX_SEED // 1024} KiB")
    return seed


def parse_user_data(user_data: str | None) -> GuestSeed:
    """Validate user_data and split it into a boot script and SSH keys."""
    if user_data is None or not user_data.strip():
        return GuestSeed()
    if len(user_data.encode()) > MAX_USER_DATA:
        raise UserDataError(f"user_data: larger than {MAX_USER_DATA // 1024} KiB")
    if "\x00" in user_data:
        raise UserDataError("user_data: must not contain NUL bytes")
    if user_data.startswith("#cloud-config"):
        return _parse_cloud_config(user_data)
    if user_data.startswith("#!"):
        keys = [
            _check_key(line.strip()[len(_KEY_MARKER) :])
            for line in user_data.splitlines()
            if line.strip().startswith(_KEY_MARKER)
        ]
        return GuestSeed(script=user_data, ssh_keys=keys)
    raise UserDataError("user_data: must be a shell script starting with #! or #cloud-config")


def _write(path: Path, content: str, mode: int) -> None:
    path.write_text(content)
    path.chmod(mode)


def _mkdir(path: Path, mode: int) -> None:
    """mkfs.ext4 -d copies owner and mode from the staging tree: set them, whatever the umask."""
    path.mkdir(exist_ok=True)
    path.chmod(mode)
    os.chown(path, 0, 0)


def create_vm_disk(path: Path, size_mib: int, hostname: str, user_data: str | None) -> None:
    """Make the VM's writable disk (sparse ext4, label "hatchdisk"), pre-seeded for the overlay
    upper layer: /etc/hostname, /etc/hatch/user-data, /root/.ssh/authorized_keys.

    Raises UserDataError for bad user_data, DiskError when mkfs.ext4 fails. Only a complete
    disk ever carries the final name."""
    seed = parse_user_data(user_data)
    if not hostname or any(c.isspace() or c in "/\0" for c in hostname) or len(hostname) > 64:
        raise UserDataError(f"invalid hostname {hostname!r}")
    if size_mib < MIN_DISK_MIB:
        raise UserDataError(f"disk size must be at least {MIN_DISK_MIB} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        _mkdir(stage, 0o755)
        upper = stage / "upper"
        _mkdir(upper, 0o755)  # the overlay root takes this directory's mode
        _mkdir(stage / "work", 0o755)
        _mkdir(upper / "etc", 0o755)
        _write(upper / "etc/hostname", hostname + "\n", 0o644)
        if seed.script:
            _mkdir(upper / "etc/hatch", 0o755)
            _write(upper / "etc/hatch/user-data", seed.script, 0o755)
        if seed.ssh_keys:
            _mkdir(upper / "root", 0o700)
            _mkdir(upper / "root/.ssh", 0o700)
            _write(upper / "root/.ssh/authorized_keys", "\n".join(seed.ssh_keys) + "\n", 0o600)
        tmp_disk = path.with_name(f".{path.name}.tmp")
        tmp_disk.unlink(missing_ok=True)
        # A 16 MiB journal instead of mke2fs's default (64 MiB from 1 GiB on): VM disks stay
        # small on the host and in snapshots. lazy_journal_init: mke2fs would write the journal
        # full of zeros, 16 MiB of I/O on every create; in a new sparse file it reads as zeros
        # already (a hole), so the disk allocates well under 1 MiB.
        journal = ["-J", "size=16"] if size_mib >= 256 else []
        options = "root_owner=0:0,lazy_journal_init=1"
        cmd = ["mkfs.ext4", "-q", "-F", "-L", "hatchdisk", *journal, "-E", options]
        result = subprocess.run(
            [*cmd, "-d", str(stage), str(tmp_disk), f"{size_mib}M"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            tmp_disk.unlink(missing_ok=True)
            raise DiskError(f"mkfs.ext4 of the VM disk failed: {result.stderr.strip()}")
        tmp_disk.rename(path)
