"""nft scripts run in-process through libnftables (nft's own library: the same parser and the
same netlink transactions as the `nft` command), so adding a guest's set elements on the wake
path costs no process start.

A libnftables context is not thread-safe and its netlink socket belongs to the network
namespace it was made in: one context per process and namespace, used under a lock.
"""

from __future__ import annotations

import ctypes
import os
import threading

from hatchvm.net.errors import NetworkError

LIBRARY = "libnftables.so.1"


class _Library:
    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL(LIBRARY)
        except OSError:
            raise NetworkError(
                f"{LIBRARY} is not installed (Debian package libnftables1, with nftables)"
            ) from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self.lib = lib


def _namespace() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


class _Context:
    def __init__(self, library: _Library) -> None:
        self.lib = library.lib
        self.netns = _namespace()
        self.ptr = self.lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not self.ptr:
            raise NetworkError("libnftables could not make a context")
        # Output and errors into buffers (read after each run), not onto hatchd's stdout.
        self.lib.nft_ctx_buffer_output(self.ptr)
        self.lib.nft_ctx_buffer_error(self.ptr)

    def run(self, script: str) -> tuple[int, str, str]:
        rc = self.lib.nft_run_cmd_from_buffer(self.ptr, script.encode())
        out = self.lib.nft_ctx_get_output_buffer(self.ptr) or b""
        err = self.lib.nft_ctx_get_error_buffer(self.ptr) or b""
        return rc, out.decode(errors="replace"), err.decode(errors="replace")

    def free(self) -> None:
        self.lib.nft_ctx_free(self.ptr)


_lock = threading.Lock()
_library: _Library | None = None
_context: _Context | None = None


def run(script: str) -> str:
    """Run an nft script (one transaction, as `nft -f` does); its output. NetworkError with
    nft's message if it fails."""
    global _library, _context
    with _lock:
        if _library is None:
            _library = _Library()
        if _context is None or _context.netns != _namespace():
            if _context is not None:
                _context.free()
            _context = None
            _context = _Context(_library)
        rc, out, err = _context.run(script)
    if rc != 0:
        raise NetworkError(f"nft failed: {err.strip() or f'error {rc}'}")
    return out
