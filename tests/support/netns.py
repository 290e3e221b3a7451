"""Put the test process into a fresh network namespace so bridges, TAPs and VMs stay inside it."""

from __future__ import annotations

import ctypes
import os
import subprocess

CLONE_NEWNET = 0x40000000


def in_initial_netns() -> bool:
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return True


def enter_fresh_netns() -> None:
    """unshare(CLONE_NEWNET) for this process, then bring loopback up.

    Must run before any thread starts: namespaces are per thread, and threads created later
    (and every child process) inherit the namespace of the thread that creates them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
