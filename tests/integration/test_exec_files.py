"""Exec, background processes and files in real guests, through hatchd's API and the guest
agent: both forms of a command, its environment, output limit and timeout, streamed output,
a sleeping VM woken by an exec, 200 MiB both ways with hatchd's memory bounded, file errors,
other users' VMs, images without an agent, an agent killed midway, and a hostile agent."""

from __future__ import annotations

import collections
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from hatchvm.client import HatchAPIError, HatchClient
from hatchvm.images.builder import AGENT_NAME
from tests.support.daemon import HatchDaemon
from tests.support.image import install_image_without_agent
from tests.support.wait import wait_for, wait_http

pytestmark = pytest.mark.vm

MiB = 1 << 20
HOSTILE_SOURCE = Path(__file__).resolve().parents[1] / "support" / "hostile_agent.c"

# A guest serving CGI scripts that stop, continue and kill its agent, whatever the agent does.
CGI = r"""#!/bin/sh
mkdir -p /srv/www/cgi-bin
cgi() {
  { printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\n'; cat; } \
    > /srv/www/cgi-bin/$1
  chmod 755 /srv/www/cgi-bin/$1
}
echo 'pidof hatch-agent || echo none' | cgi agent
echo 'kill -KILL $(pidof hatch-agent) && echo killed' | cgi kill-agent
busybox httpd -p 8080 -h /srv/www
"""


@dataclass
class World:
    hatch: HatchDaemon
    alice: HatchClient
    bob: HatchClient
    vm: dict[str, Any]  # Alice's, running, used by most tests


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    hatch = HatchDaemon(HATCH_STOP_TIMEOUT="5", HATCH_MAX_VMS_PER_USER="10")
    try:
        hatch.start()
        alice = hatch.client(hatch.create_key("alice"))
        bob = hatch.client(hatch.create_key("bob"))
        vm = alice.create_vm(mem_mib=512)
        yield World(hatch, alice, bob, vm)
        alice.close()
        bob.close()
    finally:
        hatch.cleanup()


def status_of(call: Any) -> tuple[int, str]:
    try:
        call()
    except HatchAPIError as exc:
        return exc.status, exc.message
    return 200, ""


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


# ---- exec --------------------------------------------------------------------------------


def test_a_call_right_after_create_waits_for_the_agent(world: World) -> None:
    vm = world.alice.create_vm(mem_mib=256, enable_network=False)
    # The guest is still booting: hatchd waits for its agent's hello, then runs the command.
    result = world.alice.exec(vm["id"], ["cat", "/proc/uptime"])
    assert result["exit_code"] == 0 and float(result["stdout"].split()[0]) > 0
    log = world.hatch.log_path.read_text()
    assert f'"vm_id": "{vm["id"]}", "agent": "{AGENT_NAME}"' in log
    world.alice.delete_vm(vm["id"])


def test_argv_and_shell_forms_with_env_cwd_and_stdin(world: World) -> None:
    vm = world.vm["id"]
    result = world.alice.exec(vm, ["echo", "two words", "$HOME"])
    assert result == {
        "exit_code": 0,
        "signal": None,
        "timed_out": False,
        "stdout": "two words $HOME\n",  # argv: no shell, nothing expanded
        "stderr": "",
        "truncated": False,
    }
    result = world.alice.exec(
        vm,
        'echo "$GREETING from $(pwd) as $(id -u)"; tr a-z A-Z; echo to stderr >&2; exit 3',
        env={"GREETING": "hello"},
        cwd="/tmp",
        stdin="shouted\n",
    )
    assert result["stdout"] == "hello from /tmp as 0\nSHOUTED\n"
    assert result["stderr"] == "to stderr\n" and result["exit_code"] == 3
    assert world.alice.exec(vm, "pwd; echo $PATH")["stdout"].startswith("/root\n/usr/local/")


def test_commands_run_at_the_default_priority_though_the_agent_does_not(world: World) -> None:
    # Field 19 of /proc/<pid>/stat is the nice value: the shell's parent is the agent.
    nice = "cut -d' ' -f19 /proc/$PPID/stat /proc/self/stat"
    result = world.alice.exec(world.vm["id"], nice)
    assert result["stdout"].split() == ["-20", "0"], result


def test_a_command_that_cannot_run_is_400_naming_the_field(world: World) -> None:
    vm = world.vm["id"]
    status, message = status_of(lambda: world.alice.exec(vm, ["no-such-program"]))
    assert (status, message) == (
        400,
        "cmd: cannot run no-such-program: No such file or directory",
    )
    status, message = status_of(lambda: world.alice.exec(vm, ["true"], cwd="/nowhere"))
    assert (status, message) == (400, "cwd: /nowhere: No such file or directory")
    status, message = status_of(lambda: world.alice.exec(vm, ["true"], cwd="relative"))
    assert (status, message) == (400, "cwd: must be an absolute path")
    # Through a shell it is the shell's own answer.
    result = world.alice.exec(vm, "no-such-program")
    assert result["exit_code"] == 127 and "not found" in result["stderr"]


def test_output_is_cut_at_1_mib_per_stream_and_says_so(world: World) -> None:
    result = world.alice.exec(
        world.vm["id"], "head -c 3000000 /dev/zero | tr '\\0' a; head -c 10 /dev/zero >&2"
    )
    assert len(result["stdout"]) == MiB and set(result["stdout"]) == {"a"}
    assert result["stderr"] == "\0" * 10
    assert result["truncated"] is True and result["exit_code"] == 0


def test_a_timeout_kills_the_command_and_its_children(world: World) -> None:
    vm = world.vm["id"]
    with pytest.raises(HatchAPIError) as err:
        world.alice.exec(vm, "echo begun; sleep 300 & echo $! > /tmp/child; wait", timeout_s=1)
    # An error naming the timeout, with what the command wrote until it was killed.
    assert err.value.status == 504
    assert err.value.message == "the command timed out after 1 s (timeout_s) and was killed"
    result = err.value.body
    assert result["timed_out"] is True and result["stdout"] == "begun\n"
    assert result["exit_code"] is None and result["signal"] == 9
    child = world.alice.exec(vm, ["cat", "/tmp/child"])["stdout"].strip()
    # The whole process group went: the child that would have slept 300 s is gone.
    wait_for(
        lambda: world.alice.exec(vm, ["test", "-d", f"/proc/{child}"])["exit_code"] == 1,
        30,
        "the command's child to be gone",
    )


def test_streamed_exec_delivers_output_as_it_happens(world: World) -> None:
    vm = world.vm["id"]
    world.alice.exec(vm, ["rm", "-f", "/tmp/go"])
    script = "echo first; while [ ! -e /tmp/go ]; do usleep 20000; done; echo second >&2; exit 3"
    events = world.alice.exec_stream(vm, script)
    assert next(events)["type"] == "started"
    assert next(events) == {"type": "stdout", "data": "first\n"}
    # The command is waiting for us: its first line came while it ran.
    world.alice.exec(vm, ["touch", "/tmp/go"])
    assert next(events) == {"type": "stderr", "data": "second\n"}
    assert next(events) == {"type": "exit", "exit_code": 3, "timed_out": False}
    assert list(events) == []


def test_the_cli_streams_and_exits_with_the_commands_code(world: World) -> None:
    env = {
        **os.environ,
        "HATCH_API_URL": world.hatch.url,
        "HATCH_API_KEY": world.alice._http.headers["Authorization"].split()[-1],
    }
    cli = [sys.executable, "-m", "hatchvm.cli.main"]
    done = subprocess.run(
        [
            *cli,
            "exec",
            world.vm["id"],
            "-e",
            "N=5",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit $N",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout, done.stderr) == (5, "out\n", "err\n")
    done = subprocess.run(
        [*cli, "exec", "vm_000000000000", "--", "true"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 255 and "vm vm_000000000000 not found" in done.stderr
    done = subprocess.run(
        [*cli, "exec", world.vm["id"], "--timeout", "1", "--", "sleep", "30"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 124 and "timed out after 1 s" in done.stderr

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "in.txt"
        local.write_bytes(b"copied\n" * 1000)
        up = subprocess.run(
            [*cli, "cp", str(local), f"{world.vm['id']}:/root/cli/"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert up.returncode == 1 and "No such file or directory" in up.stderr
        up = subprocess.run(
            [*cli, "cp", "-p", "--mode", "0600", str(local), f"{world.vm['id']}:/root/cli/"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert up.returncode == 0, up.stderr
        down = subprocess.run(
            [*cli, "cp", f"{world.vm['id']}:/root/cli/in.txt", str(Path(tmp) / "out.txt")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode == 0, down.stderr
        assert (Path(tmp) / "out.txt").read_bytes() == local.read_bytes()
    assert world.alice.stat_file(world.vm["id"], "/root/cli/in.txt")["mode"] == "0600"


def test_background_processes(world: World) -> None:
    vm = world.vm["id"]
    api = world.alice
    api.exec(vm, ["rm", "-f", "/tmp/bg-go"])
    script = "echo started; while [ ! -e /tmp/bg-go ]; do usleep 20000; done; echo done >&2; exit 4"
    response = api.request("POST", f"/vms/{vm}/exec", json={"cmd": script, "background": True})
    assert response.status_code == 201, response.text
    worker = response.json()
    assert worker["state"] == "running" and worker["cmd"].startswith("/bin/sh -c echo started")
    sleeper = api.exec(vm, ["sleep", "600"], background=True)
    assert [p["pid"] for p in api.list_processes(vm)][-2:] == [worker["pid"], sleeper["pid"]]

    api.exec(vm, ["touch", "/tmp/bg-go"])
    finished = wait_for(
        lambda: (p := api.get_process(vm, worker["pid"]))["state"] == "exited" and p,
        30,
        "the background process to end",
    )
    assert finished["exit_code"] == 4 and finished["signal"] is None
    assert (finished["stdout"], finished["stderr"]) == ("started\n", "done\n")
    assert finished["stdout_bytes"] == 8 and finished["truncated"] is False

    assert api.kill_process(vm, sleeper["pid"])["pid"] == sleeper["pid"]  # TERM by default
    killed = wait_for(
        lambda: (p := api.get_process(vm, sleeper["pid"]))["state"] == "exited" and p,
        30,
        "the sleeper to die",
    )
    assert killed["signal"] == 15 and killed["exit_code"] is None

    assert api.delete_process(vm, worker["pid"]) == {"status": "deleted"}
    status, message = status_of(lambda: api.get_process(vm, worker["pid"]))
    assert (status, message) == (404, f"no background process {worker['pid']}")
    assert worker["pid"] not in [p["pid"] for p in api.list_processes(vm)]
    status, _ = status_of(lambda: api.exec(vm, ["cat"], stdin="x", background=True))
    assert status == 400


def test_exec_wakes_a_snapshotted_or_stopped_vm(world: World) -> None:
    api = world.alice
    vm = api.create_vm(mem_mib=256, enable_network=False)
    api.exec(vm["id"], "echo kept > /root/state")
    api.snapshot_vm(vm["id"])
    assert api.get_vm(vm["id"])["state"] == "snapshotted"
    assert api.exec(vm["id"], ["cat", "/root/state"])["stdout"] == "kept\n"
    assert api.get_vm(vm["id"])["state"] == "running"

    api.stop_vm(vm["id"])
    assert api.exec(vm["id"], ["cat", "/root/state"])["stdout"] == "kept\n"  # a cold boot
    assert api.get_vm(vm["id"])["state"] == "running"
    api.snapshot_vm(vm["id"])
    assert api.list_files(vm["id"], "/root")["entries"][-1]["name"] == "state"
    api.delete_vm(vm["id"])


# ---- files -------------------------------------------------------------------------------


class PeakRSS:
    """hatchd's peak resident memory over a stretch of time (the kernel's high-water mark,
    reset at the start)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_kib(pid)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    @property
    def peak(self) -> int:
        return rss_kib(self.pid, "VmHWM")


def test_200_mib_both_ways_with_hatchds_memory_bounded(world: World) -> None:
    api, vm, pid = world.alice, world.vm["id"], world.hatch.proc.pid  # type: ignore[union-attr]
    size = 200 * MiB
    with tempfile.NamedTemporaryFile(prefix="hatch-200m-") as local:
        digest = hashlib.sha256()
        for _ in range(size // MiB):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            local.write(chunk)
        local.flush()
        local.seek(0)

        def chunks() -> Iterator[bytes]:
            while chunk := local.read(MiB):
                yield chunk

        rss = PeakRSS(pid)
        started = time.monotonic()
        info = api.upload_file(vm, "/root/big.bin", chunks())
        up_s = time.monotonic() - started
        up_peak = rss.peak
    assert info["size"] == size
    remote = api.exec(vm, ["sha256sum", "/root/big.bin"], timeout_s=300)["stdout"].split()[0]
    assert remote == digest.hexdigest()

    rss = PeakRSS(pid)
    started = time.monotonic()
    back, got = hashlib.sha256(), 0
    for chunk in api.download_file(vm, "/root/big.bin"):
        back.update(chunk)
        got += len(chunk)
    down_s = time.monotonic() - started
    down_peak = rss.peak
    print(
        f"200 MiB up: {up_s:.1f} s ({size / MiB / up_s:.0f} MiB/s), hatchd RSS "
        f"{rss.before // 1024} MiB before, peak {up_peak // 1024} MiB; down: {down_s:.1f} s "
        f"({size / MiB / down_s:.0f} MiB/s), peak {down_peak // 1024} MiB"
    )
    assert got == size and back.hexdigest() == digest.hexdigest()
    for peak in (up_peak, down_peak):
        assert peak - rss.before < 48 * 1024, f"hatchd grew to {peak} KiB"
    api.delete_file(vm, "/root/big.bin")


def test_file_errors_are_clear_statuses(world: World) -> None:
    api, vm = world.alice, world.vm["id"]
    api.exec(vm, "rm -rf /root/t; mkdir -p /root/t/dir/sub; echo x > /root/t/file")
    cases = [
        (lambda: api.stat_file(vm, "/root/t/missing"), 404, "/root/t/missing: No such file"),
        (lambda: b"".join(api.download_file(vm, "/root/t/missing")), 404, "No such file"),
        (lambda: b"".join(api.download_file(vm, "/root/t/dir")), 409, "Is a directory"),
        (lambda: b"".join(api.download_file(vm, "/dev/zero")), 409, "not a regular file"),
        (lambda: api.list_files(vm, "/root/t/file"), 409, "Not a directory"),
        (lambda: api.upload_file(vm, "/root/t/dir", b"x"), 409, "Is a directory"),
        (lambda: api.upload_file(vm, "/root/t/no/such", b"x"), 404, "No such file"),
        (lambda: api.upload_file(vm, "/root/t/file/below", b"x"), 409, "Not a directory"),
        (lambda: api.upload_file(vm, "/sys/hatch", b"x"), 409, "/sys/hatch: Permission denied"),
        (lambda: api.delete_file(vm, "/root/t/dir"), 409, "Directory not empty"),
        (lambda: api.delete_file(vm, "/root/t/missing"), 404, "No such file"),
        (lambda: api.stat_file(vm, "relative/path"), 400, "path: "),
    ]
    for call, status, words in cases:
        got, message = status_of(call)
        assert got == status and words in message, (status, words, got, message)

    info = api.upload_file(
        vm, "/root/t/new/deep/f.sh", b"#!/bin/sh\necho ran\n", parents=True, mode=0o755
    )
    assert (info["kind"], info["size"], info["mode"]) == ("file", 19, "0755")
    assert api.exec(vm, ["/root/t/new/deep/f.sh"])["stdout"] == "ran\n"
    listing = api.list_files(vm, "/root/t")
    assert [(e["name"], e["kind"]) for e in listing["entries"]] == [
        ("dir", "dir"),
        ("file", "file"),
        ("new", "dir"),
    ]
    assert api.delete_file(vm, "/root/t", recursive=True) == {"status": "deleted"}
    assert status_of(lambda: api.stat_file(vm, "/root/t"))[0] == 404
    # Any request Content-Type is taken for a download, and the body is the file.
    response = world.alice._http.get(
        f"/vms/{vm}/files", params={"path": "/etc/hostname"}, headers={"Content-Type": "text/x"}
    )
    assert response.status_code == 200 and response.text == vm.replace("_", "-") + "\n"
    assert response.headers["content-type"] == "application/octet-stream"


# ---- other users, images without an agent, a killed agent ---------------------------------

# Every call into a VM: (method, path, query, body).
GUEST_CALLS: list[tuple[str, str, dict[str, str] | None, Any]] = [
    ("POST", "/vms/{vm}/exec", None, {"cmd": ["touch", "/root/pwned"]}),
    ("POST", "/vms/{vm}/exec", None, {"cmd": "touch /root/pwned", "background": True}),
    ("POST", "/vms/{vm}/exec/stream", None, {"cmd": ["touch", "/root/pwned"]}),
    ("GET", "/vms/{vm}/processes", None, None),
    ("GET", "/vms/{vm}/processes/{pid}", None, None),
    ("POST", "/vms/{vm}/processes/{pid}/kill", None, None),
    ("DELETE", "/vms/{vm}/processes/{pid}", None, None),
    ("PUT", "/vms/{vm}/files", {"path": "/root/pwned"}, b"owned"),
    ("GET", "/vms/{vm}/files", {"path": "/etc/hostname"}, None),
    ("GET", "/vms/{vm}/files/stat", {"path": "/etc/hostname"}, None),
    ("GET", "/vms/{vm}/files/list", {"path": "/root"}, None),
    ("DELETE", "/vms/{vm}/files", {"path": "/root/keep"}, None),
    ("GET", "/vms/{vm}/console", None, None),
]


def guest_call(
    client: HatchClient, call: tuple[str, str, Any, Any], vm_id: str, pid: int
) -> httpx.Response:
    method, path, query, body = call
    url = path.format(vm=vm_id, pid=pid)
    if isinstance(body, bytes):
        return client.request(method, url, params=query, content=body)
    return client.request(method, url, json=body, params=query)


def test_another_users_vm_is_404_for_exec_files_processes_and_console(world: World) -> None:
    """Exec on someone else's VM would be remote code execution: every call is the 404 an
    unknown VM gets, word for word, and nothing happens in the guest. Positive control: the
    owner's same calls succeed."""
    alice, bob, vm = world.alice, world.bob, world.vm["id"]
    alice.exec(vm, "rm -f /root/pwned; echo keep > /root/keep")
    pid = alice.exec(vm, ["sleep", "600"], background=True)["pid"]
    unknown = "vm_000000000000"
    for call in GUEST_CALLS:
        response = guest_call(bob, call, vm, pid)
        control = guest_call(bob, call, unknown, pid)
        assert response.status_code == 404, (call, response.text)
        assert response.json() == {"error": f"vm {vm} not found"}
        assert control.json() == {"error": f"vm {unknown} not found"}
    assert status_of(lambda: alice.stat_file(vm, "/root/pwned"))[0] == 404  # nothing ran
    assert alice.get_process(vm, pid)["state"] == "running"
    assert alice.exec(vm, ["cat", "/root/keep"])["stdout"] == "keep\n"

    for call in GUEST_CALLS:  # the owner: the same calls go through
        response = guest_call(alice, call, vm, pid)
        assert response.status_code in (200, 201), (call, response.text)
    alice.exec(vm, ["rm", "-f", "/root/pwned"])


def test_images_without_the_agent(daemon_factory) -> None:
    """An image that says it has no agent answers 409 at once (its VM works); one that does
    not say is waited for, up to HATCH_AGENT_READY_TIMEOUT, then 503."""
    hatch = daemon_factory(HATCH_AGENT_READY_TIMEOUT="8")
    hatch.start()
    install_image_without_agent(hatch.settings(), "img_noagent")
    install_image_without_agent(hatch.settings(), "img_unsaid", says_so=False)
    web = (
        "#!/bin/sh\nmkdir -p /srv/www\necho up > /srv/www/index.html\n"
        "busybox httpd -p 8080 -h /srv/www\n"
    )
    with hatch.client(hatch.create_key("carol")) as api:
        vm = api.create_vm(image_id="img_noagent", mem_mib=256, user_data=web)
        # A deadline shorter than the readiness timeout: an answer in time did not wait.
        quick = HatchClient(hatch.url, api._http.headers["Authorization"].split()[-1], timeout=4)
        expected = (
            f"vm {vm['id']} has no guest agent (its image img_noagent was built without one): "
        )
        for capability, call in [
            ("exec", lambda: quick.exec(vm["id"], ["true"])),
            ("exec", lambda: quick.list_processes(vm["id"])),
            ("files", lambda: quick.stat_file(vm["id"], "/etc/hostname")),
            ("files", lambda: b"".join(quick.download_file(vm["id"], "/etc/hostname"))),
        ]:
            assert status_of(call) == (409, f"{expected}{capability} needs it")
        quick.close()
        assert wait_http(f"http://{vm['guest_ip']}:8080/").strip() == "up"  # it works

        unsaid = api.create_vm(image_id="img_unsaid", mem_mib=256, enable_network=False)
        status, message = status_of(lambda: api.exec(unsaid["id"], ["true"]))
        assert (status, message) == (
            503,
            f"the guest agent of vm {unsaid['id']} did not answer in 8 s "
            "(HATCH_AGENT_READY_TIMEOUT)",
        )


def test_a_killed_agent_is_a_clear_error_and_comes_back(world: World) -> None:
    api = world.alice
    vm = api.create_vm(mem_mib=256, user_data=CGI)
    old = wait_http(f"http://{vm['guest_ip']}:8080/cgi-bin/agent").strip()
    assert old != "none"
    events = api.exec_stream(vm["id"], ["sleep", "600"], timeout_s=600)
    assert next(events)["type"] == "started"
    lines: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: lines.extend(events))
    reader.start()
    assert wait_http(f"http://{vm['guest_ip']}:8080/cgi-bin/kill-agent").strip() == "killed"
    reader.join(60)  # init starts a new agent, whose hello ends the old one's requests
    assert not reader.is_alive()
    assert lines == [
        {
            "type": "error",
            "error": f"vm {vm['id']}: the guest agent restarted; what it was doing for this "
            "request is lost",
        }
    ]
    new = wait_http(f"http://{vm['guest_ip']}:8080/cgi-bin/agent").strip()
    assert new not in ("none", old)
    assert api.exec(vm["id"], ["echo", "back"])["stdout"] == "back\n"
    api.delete_vm(vm["id"])


# ---- a hostile agent ----------------------------------------------------------------------


def test_a_hostile_agent_cannot_hurt_hatchd(world: World, tmp_path: Path) -> None:
    """The guest replaces its agent with one that floods, stalls, lies about frame sizes and
    speaks garbage: each call ends with a clean error, hatchd's memory stays flat, and the
    neighbour VM is served throughout."""
    api, hatch = world.alice, world.hatch
    binary = tmp_path / "hostile-agent"
    subprocess.run(["gcc", "-static", "-O1", "-o", str(binary), str(HOSTILE_SOURCE)], check=True)
    vm = api.create_vm(mem_mib=256, enable_network=False)["id"]
    api.upload_file(vm, "/root/hostile-agent", binary.read_bytes(), mode=0o755)
    # Its output goes to the console: its pipes lead to the agent it kills, and a write to
    # them then (a kill's complaint about a pid already gone) would end it by SIGPIPE.
    swap = (
        "exec </dev/null >/dev/console 2>&1; "
        "sed -i '/hatch-agent/d' /etc/inittab && kill -HUP 1; "
        "while pids=$(pidof hatch-agent); do kill -KILL $pids; usleep 50000; done; "
        "exec /root/hostile-agent"
    )
    # The answer may be lost with the agent it kills; the swap goes on either way.
    assert status_of(lambda: api.exec(vm, swap, background=True))[0] in (200, 503)

    # Nothing is sent while the agents change places (a request read half by the dying one
    # would leave the new one out of step): its hello, said unasked, shows in hatchd's log.
    def started() -> int:
        return hatch.log_path.read_text().count(f'"vm_id": "{vm}", "requests_lost"')

    wait_for(lambda: started() >= 2, 60, "the hostile agent to take the port")
    assert api.exec(vm, ["anything"])["stdout"] == ""  # the hostile agent's answer
    pid = hatch.proc.pid  # type: ignore[union-attr]
    baseline = rss_kib(pid)
    # A client that stops reading a streamed flood: hatchd stops granting credit, holds no
    # more than the window, and drops the agent's connection at the first frame past it.
    with api._http.stream(
        "POST", f"/vms/{vm}/exec/stream", json={"cmd": ["flood"]}, timeout=60
    ) as response:
        # Kept: a line iterator dropped at once would close the response (and disconnect).
        lines = response.iter_lines()
        assert next(lines) == '{"type":"started","pid":4242}'
        wait_for(
            lambda: "frames granted for one answer" in hatch.log_path.read_text(),
            120,
            "hatchd to cut the flood off at its credit",
        )
    # The flood may have left part of a frame in the port's queue, which the next connection
    # gets first: hatchd drops that one (or times out on it); the hostile agent answers a
    # plain command cleanly once the leftovers are gone.
    wait_for(
        lambda: status_of(lambda: api.exec(vm, ["anything"]))[0] == 200,
        300,
        "the port to be clean after the flood",
    )
    # In this order: each misbehaviour lasts until hatchd hangs up or cancels, and garbage
    # (last) may leave bytes in flight for the next connection.
    cases = [
        (["badexit"], None, 502, "an exit with neither or both of an exit code and a signal"),
        (["oversize"], None, 502, "exceeds the 65536-byte bound"),
        (["flood"], None, 502, "more than the 1048576 bytes of stdout asked for"),
        (["stall"], 1, 504, "did not end the command within 10 s past its timeout"),
    ]
    for argv, timeout_s, status, words in cases:
        got, message = status_of(lambda a=argv, t=timeout_s: api.exec(vm, a, timeout_s=t))
        print(f"{argv[0]}: {got} {message}")
        assert got == status and words in message, (argv, got, message)
        assert httpx.get(f"{hatch.url}/healthz", timeout=5).status_code == 200
        assert api.exec(world.vm["id"], ["echo", "fine"])["stdout"] == "fine\n"
    # Streamed, output is not limited: a command that never ends is ended by its timeout.
    for argv in (["stall"], ["endless"]):
        kinds: collections.Counter[str] = collections.Counter()
        for event in api.exec_stream(vm, argv, timeout_s=1):
            kinds[event["type"]] += 1
            last = event
        assert kinds["started"] == 1 and kinds["stdout"] >= 1 and last["type"] == "error"
        assert "did not end the command within 10 s" in last["error"]
        print(f"{argv[0]}, streamed: {dict(kinds)}, then {last['error']}")
    got, message = status_of(lambda: api.exec(vm, ["garbage"]))
    assert got == 502 and "broke the protocol" in message, message
    assert api.exec(world.vm["id"], ["echo", "fine"])["stdout"] == "fine\n"
    assert "guest agent connection dropped" in hatch.log_path.read_text()
    growth = rss_kib(pid) - baseline
    print(f"hatchd RSS growth under the hostile agent: {growth} KiB")
    assert growth < 32 * 1024
    api.delete_vm(vm)
