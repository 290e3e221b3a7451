"""README's flow, word for word, on the default settings: what a newcomer does first.

hatchd runs from a fresh working directory with no HATCH_* variable at all: the relative
./data, the API on :8080, the proxy on :9090, the default bridge, TAP prefix and nft table
(the suite's own network namespace keeps them away from the machine's). The commands are the
installed console scripts, as README writes them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hatchvm.config import Settings
from hatchvm.net.alloc import tap_name
from tests.support.cgroups import host_cgroups, remove_parent
from tests.support.daemon import LOG_DIR
from tests.support.host import asleep, qemu_pids
from tests.support.ssh import ssh, ssh_key
from tests.support.wait import wait_for

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
API = "http://127.0.0.1:8080"
PROXY = "http://127.0.0.1:9090/"


class Newcomer:
    """A shell in a fresh clone's directory with nothing configured."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HATCH_")}
        self.daemon: subprocess.Popen[bytes] | None = None
        self.log = workdir / "hatchd.log"

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stderr}"
        return result

    def json(self, *args: str) -> dict:
        return json.loads(self.run(*args, "--json").stdout)

    def start_daemon(self) -> None:
        with self.log.open("ab") as log:
            self.daemon = subprocess.Popen(
                [str(BIN / "hatchd")],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

        def healthy() -> bool:
            assert self.daemon is not None and self.daemon.poll() is None, self.log.read_text()
            try:
                return httpx.get(API + "/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 120, "hatchd on :8080")

    def cleanup(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(20)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
        data = self.workdir / "data"
        subprocess.run(["pkill", "-9", "-f", f"hatch-vm_.*{data}"], check=False)
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name == "hatchbr0" or name.startswith("hv"):
                subprocess.run(["ip", "link", "del", name], check=False)
        for family in ("ip", "bridge", "inet"):
            subprocess.run(["nft", "delete", "table", family, "hatchvm"], capture_output=True)
        if (cgroups := host_cgroups("hatchvm")) is not None:  # the default HATCH_CGROUP_PARENT
            remove_parent(cgroups)


@pytest.fixture
def newcomer(tmp_path: Path) -> Iterator[Newcomer]:
    clone = tmp_path / "hatchvm"
    (clone / "examples").mkdir(parents=True)
    shutil.copy(REPO / "examples" / "web.sh", clone / "examples" / "web.sh")
    person = Newcomer(clone)
    yield person
    person.cleanup()
    kept = LOG_DIR / "readme-flow"  # where a person can read them after a failure
    kept.mkdir(parents=True, exist_ok=True)
    for log in [person.log, *clone.glob("data/vms/*/console.log")]:
        shutil.copy(log, kept / f"{log.parent.name}-{log.name}")


def via_proxy(subdomain: str) -> httpx.Response:
    return httpx.get(PROXY, headers={"Host": f"{subdomain}.hatch.local"}, timeout=120)


def test_readme_flow_on_the_default_settings(newcomer: Newcomer, tmp_path: Path) -> None:
    # scripts/setup: build the image (from the .deb cache the suite filled), then run hatchd.
    newcomer.run("hatchvm", "image", "build")
    newcomer.start_daemon()
    assert (newcomer.workdir / "data" / "hatchvm.db").exists()  # ./data, relative to the clone

    created = newcomer.run("hatchvm", "keys", "create", "--user", "me")
    key = created.stdout.strip()
    assert key.startswith("hatch_") and "\n" not in key  # $(...) takes the key alone
    newcomer.env["HATCH_API_KEY"] = key

    # The README's example, plus the SSH key it says user_data carries.
    identity, public = ssh_key(tmp_path)
    script = newcomer.workdir / "examples" / "web.sh"
    script.write_text(script.read_text() + f"# ssh-authorized-key: {public}\n")
    vm = newcomer.json("hatchvm", "vm", "create", "--mem", "256", "--user-data", "examples/web.sh")
    assert vm["state"] == "running"
    listed = newcomer.run("hatchvm", "vm", "list").stdout
    assert vm["id"] in listed

    def served() -> str | None:
        answer = httpx.get(f"http://{vm['guest_ip']}:8080/", timeout=2)
        return answer.text if answer.status_code == 200 else None

    hello = wait_for(served, 120, "the guest's web server")
    assert hello.startswith("hello from ")

    snap = newcomer.json("hatchvm", "vm", "snapshot", vm["id"])
    assert newcomer.json("hatchvm", "vm", "get", vm["id"])["state"] == "snapshotted"
    assert asleep(vm["id"], tap_name(Settings.model_fields["tap_prefix"].default, vm["id"]))
    restored = newcomer.json("hatchvm", "vm", "restore", vm["id"])
    assert restored["state"] == "running"
    assert snap["id"] in newcomer.run("hatchvm", "snapshot", "list", vm["id"]).stdout

    route = newcomer.json(
        "hatchvm", "route", "create", vm["id"], "--port", "8080", "--subdomain", "myapp"
    )
    assert route["url"] == "http://myapp.hatch.local:9090"
    assert via_proxy("myapp").text == hello

    # Asleep, then woken by a request through the proxy.
    newcomer.run("hatchvm", "vm", "snapshot", vm["id"])
    assert newcomer.json("hatchvm", "vm", "get", vm["id"])["state"] == "snapshotted"
    assert via_proxy("myapp").text == hello
    assert newcomer.json("hatchvm", "vm", "get", vm["id"])["state"] == "running"

    # Asleep, then woken by ssh through the gateway.
    newcomer.run("hatchvm", "vm", "snapshot", vm["id"])
    shell = ssh(identity, vm["ssh_port"], "cat /srv/www/index.html")
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout == hello

    assert newcomer.json("hatchvm", "vm", "stop", vm["id"])["state"] == "stopped"
    assert newcomer.json("hatchvm", "vm", "start", vm["id"])["state"] == "running"
    assert wait_for(served, 120, "the web server after a cold boot") == hello
    newcomer.run("hatchvm", "vm", "delete", vm["id"])
    assert qemu_pids(vm["id"]) == []
    assert not (newcomer.workdir / "data" / "vms" / vm["id"]).exists()
