"""Per-uid access to one file through its POSIX ACL (the system.posix_acl_access xattr), for
jailed Firecrackers: each VM's uid may read the base image it boots from, or read and write its
own disk, for as long as its jail exists, while the file stays root's, with its mode's owner
bits unchanged and nobody else's access widened.

The xattr is Linux's posix_acl_xattr: a version word (2), then (tag, perm, id) entries sorted by
tag, then id. Named entries need a MASK entry, which the kernel shows as the mode's group bits;
an ACL back down to the three base entries turns into plain mode bits again.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

XATTR = "system.posix_acl_access"
_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED = 0xFFFFFFFF
READ, WRITE = 4, 2

Entry = tuple[int, int, int]  # (tag, perm, id)


class ACLError(Exception):
    """A file's ACL could not be read or written; the message names the file."""


def _decode(blob: bytes) -> list[Entry]:
    (version,) = _HEADER.unpack_from(blob)
    if version != _VERSION or (len(blob) - _HEADER.size) % _ENTRY.size:
        raise ValueError("not a version-2 POSIX ACL")
    entries = []
    for offset in range(_HEADER.size, len(blob), _ENTRY.size):
        tag, perm, ident = _ENTRY.unpack_from(blob, offset)
        entries.append((tag, perm, ident))
    return entries


def _encode(entries: list[Entry]) -> bytes:
    ordered = sorted(entries, key=lambda e: (e[0], e[2]))
    return _HEADER.pack(_VERSION) + b"".join(_ENTRY.pack(*e) for e in ordered)


def _base_entries(mode: int) -> list[Entry]:
    return [
        (USER_OBJ, (mode >> 6) & 7, _UNDEFINED),
        (GROUP_OBJ, (mode >> 3) & 7, _UNDEFINED),
        (OTHER, mode & 7, _UNDEFINED),
    ]


def _read(fd: int) -> list[Entry]:
    try:
        return _decode(os.getxattr(fd, XATTR))
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
    return _base_entries(os.fstat(fd).st_mode)


def _with_mask(entries: list[Entry]) -> list[Entry]:
    """The entries with a MASK covering the group class, or none when nothing is named."""
    entries = [e for e in entries if e[0] != MASK]
    named = [e for e in entries if e[0] in (USER, GROUP)]
    if not named:
        return entries
    mask = 0
    for tag, perm, _ in entries:
        if tag in (USER, GROUP, GROUP_OBJ):
            mask |= perm
    return [*entries, (MASK, mask, _UNDEFINED)]


def _open(path: os.PathLike[str] | str) -> int:
    """The file itself, never what a symlink in its place points to."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ACLError(f"{path} is not a regular file")
    return fd


def grant(path: os.PathLike[str] | str, uid: int, perm: int) -> None:
    """uid may access the file with perm (READ, READ | WRITE) on top of what it had."""
    try:
        fd = _open(path)
    except OSError as exc:
        raise ACLError(f"cannot open {path}: {exc.strerror}") from None
    try:
        entries = [e for e in _read(fd) if not (e[0] == USER and e[2] == uid)]
        entries.append((USER, perm, uid))
        os.setxattr(fd, XATTR, _encode(_with_mask(entries)))
    except (OSError, ValueError) as exc:
        raise ACLError(f"cannot give uid {uid} access to {path}: {_why(exc)}") from None
    finally:
        os.close(fd)


def revoke(path: os.PathLike[str] | str, uid: int) -> None:
    """uid's own entry goes (others stay). Idempotent; a missing file has nothing to revoke."""
    try:
        fd = _open(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ACLError(f"cannot open {path}: {exc.strerror}") from None
    try:
        entries = _read(fd)
        kept = [e for e in entries if not (e[0] == USER and e[2] == uid)]
        if kept != entries:
            os.setxattr(fd, XATTR, _encode(_with_mask(kept)))
    except (OSError, ValueError) as exc:
        raise ACLError(f"cannot take uid {uid}'s access to {path} away: {_why(exc)}") from None
    finally:
        os.close(fd)


def users(path: os.PathLike[str] | str) -> dict[int, int]:
    """The named users of the file's ACL and their permissions."""
    fd = _open(path)
    try:
        return {ident: perm for tag, perm, ident in _read(fd) if tag == USER}
    finally:
        os.close(fd)


def _why(exc: OSError | ValueError) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.EOPNOTSUPP:
        return "the filesystem has no POSIX ACLs"
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
