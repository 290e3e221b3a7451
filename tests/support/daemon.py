"""A real hatchd process for tests: started with its own data dir, bridge and nft table."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from hatchvm import admin
from hatchvm.client import HatchClient
from hatchvm.config import Settings, load_settings
from hatchvm.vmm.accel import detect_accel
from tests.support.cgroups import host_cgroups, remove_parent
from tests.support.image import install_image

_counter = itertools.count(1)
LOG_DIR = Path(tempfile.gettempdir()) / "hatchvm-test-logs"
# Under pytest-xdist each worker counts its daemons from 1: its logs go apart ("gw0-d3").
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
WORKER_PREFIX = f"{_WORKER}-" if _WORKER else ""


@functools.cache
def host_accel() -> str:
    """The accelerator hatchd's `auto` would choose on this host (in a thread of its own: the
    caller may be inside a running event loop)."""
    qemu_bin = Settings.model_fields["qemu_bin"].default
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, detect_accel(qemu_bin, "auto")).result()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HatchDaemon:
    """One hatchd. Each instance gets a distinct bridge, subnet, TAP prefix and nft table,
    so a leftover from one test cannot disturb the next."""

    def __init__(self, with_image: bool = True, **env: str) -> None:
        n = next(_counter)
        self.n = n
        # Short path: QMP sockets live under it and Unix socket paths are limited to 108 bytes.
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"hv{n}-", dir="/tmp"))
        self.port = free_port()
        self.proxy_port = free_port()
        self.bridge = f"hbt{n}"
        self.tap_prefix = "t" + "abcdefghijklmnopqrstuvwxyz"[n % 26]
        self.table = f"hatchtest{n}"
        # Never 172.16.0.0/24: that is the default bridge, which the README-flow test uses.
        self.subnet = f"172.16.{n % 250 + 1}"
        # Its own cgroup parent: a daemon's start-up sweep never touches another's VMs.
        self.cgroup_parent = f"hatchvm-test-{self.data_dir.name}"
        self.env = {
            "HATCH_DATA_DIR": str(self.data_dir),
            "HATCH_RUN_DIR": str(self.data_dir / "run"),
            "HATCH_HTTP_ADDR": f"127.0.0.1:{self.port}",
            "HATCH_PROXY_ADDR": f"127.0.0.1:{self.proxy_port}",
            "HATCH_SSH_HOST": "127.0.0.1",
            "HATCH_SSH_PORT_MIN": str(20000 + 100 * (n % 400)),
            "HATCH_SSH_PORT_MAX": str(20000 + 100 * (n % 400) + 99),
            "HATCH_BRIDGE_NAME": self.bridge,
            "HATCH_BRIDGE_CIDR": f"{self.subnet}.1/24",
            "HATCH_TAP_PREFIX": self.tap_prefix,
            "HATCH_NFT_TABLE": self.table,
            "HATCH_CGROUP_PARENT": self.cgroup_parent,
            # Probed once per test run, not at each of the suite's ~150 daemon starts (a
            # probe waits up to 3 s where KVM is unusable); test_readme_flow keeps "auto".
            "HATCH_QEMU_ACCEL": host_accel(),
            "HATCH_STOP_TIMEOUT": "30",
            "HATCH_LOG_LEVEL": "info",
            # Off unless a test turns them on (test_templates.py): a background template build
            # would boot a VM beside every test that creates two of one shape.
            "HATCH_TEMPLATES": "false",
            # The VM tests on a real Firecracker: HATCH_TEST_VMM=firecracker (see conftest).
            **({"HATCH_VMM": vmm} if (vmm := os.environ.get("HATCH_TEST_VMM")) else {}),
            **env,
        }
        if with_image:
            install_image(self.data_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "hatchd.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self) -> Any:
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return load_settings()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def create_key(self, user: str) -> str:
        _info, key = asyncio.run(admin.create_key(self.settings(), user))
        return key

    def client(self, key: str) -> HatchClient:
        return HatchClient(self.url, key, timeout=180)

    def start(self, timeout: float = 60) -> None:
        env = {**os.environ, **self.env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hatchvm.daemon"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hatchd exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"hatchd did not answer within {timeout}s:\n{self.log_tail()}")

    def events(self, name: str, vm_id: str | None = None) -> list[dict[str, Any]]:
        """hatchd's log records (JSON lines) of this event, about vm_id if given."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name and vm_id in (None, record.get("vm_id")):
                found.append(record)
        return found

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL: the daemon dies without any chance to clean up."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def keep_logs(self) -> None:
        """Copy hatchd's log and the guests' consoles where a person can read them later."""
        dest = LOG_DIR / f"{WORKER_PREFIX}d{self.n}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for log in [self.log_path, *self.data_dir.glob("vms/*/console.log")]:
            if log.exists():
                name = log.name if log == self.log_path else f"{log.parent.name}.console.log"
                shutil.copy(log, dest / name)

    def cleanup(self) -> None:
        """Stop the daemon and remove every VM process, link and table it may have left."""
        self.stop()
        self.keep_logs()
        subprocess.run(["pkill", "-9", "-f", f"hatch-vm_.*{self.data_dir}"], check=False)
        for pidfile in self.data_dir.glob("vms/*/qemu.pid"):
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name == self.bridge or name.startswith(self.tap_prefix):
                subprocess.run(["ip", "link", "del", name], check=False)
        for family in ("inet", "ip", "bridge"):
            subprocess.run(
                ["nft", "delete", "table", family, self.table], check=False, capture_output=True
            )
        if (cgroups := host_cgroups(self.cgroup_parent)) is not None:
            remove_parent(cgroups)
        shutil.rmtree(self.data_dir, ignore_errors=True)
