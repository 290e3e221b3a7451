"""The proxy's limits against a real hatchd and real guests: a bounded flood of idle, slowloris,
half-closed and stalled-body connections from several loopback addresses (the API and other
clients keep being answered, hatchd's memory and descriptors stay bounded, the limits answer
429 and 503, every flood connection is closed by its timeout); a hostile guest (busybox `nc`)
whose response head never ends or whose body stalls; a wake that fails (the snapshot's
artifacts are gone), which backs off and then puts the VM in error."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from hatchvm.snapshots.chunks import namespace
from tests.support.daemon import HatchDaemon
from tests.support.wait import wait_for, wait_http

pytestmark = pytest.mark.vm

LIMITS = {
    "HATCH_PROXY_MAX_CONNECTIONS": "400",
    "HATCH_PROXY_MAX_CONNECTIONS_PER_ADDRESS": "100",
    "HATCH_PROXY_HEAD_TIMEOUT": "12",  # long enough for the flood to be built up first
    "HATCH_PROXY_CLIENT_TIMEOUT": "12",
    "HATCH_PROXY_UPSTREAM_TIMEOUT": "5",
    "HATCH_WAKE_RETRY_BACKOFF": "2",
    "HATCH_WAKE_MAX_FAILURES": "3",
}

# Port 8080: busybox httpd. Port 8081: a guest that misbehaves by path (busybox nc runs the
# script per connection, the socket on its stdin and stdout).
GUEST = r"""#!/bin/sh
mkdir -p /srv/www
echo "hello from $(hostname)" > /srv/www/index.html
cat > /srv/hostile <<'SCRIPT'
#!/bin/sh
read -r method path version
case "$path" in
/endless-head)
  printf 'HTTP/1.1 200 OK\r\n'
  yes "$(printf 'X-Endless: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r')" ;;
/endless-value)
  printf 'HTTP/1.1 200 OK\r\nX-Endless: '
  yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | tr -d '\n' ;;
/stall)
  printf 'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nten bytes!'
  sleep 3600 ;;
/upload)
  cat > /dev/null ;;
esac
SCRIPT
chmod +x /srv/hostile
nc -ll -p 8081 -e /srv/hostile &
echo ready > /srv/www/ready
busybox httpd -p 8080 -h /srv/www
"""


@pytest.fixture(scope="module")
def hatch() -> Iterator[HatchDaemon]:
    d = HatchDaemon(**LIMITS)
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def guest(hatch: HatchDaemon) -> Iterator[dict]:
    with hatch.client(hatch.create_key("alice")) as api:
        vm = api.create_vm(user_data=GUEST, mem_mib=256)
        wait_http(f"http://{vm['guest_ip']}:8080/ready")
        api.create_route(vm["id"], target_port=8080, subdomain="web")
        api.create_route(vm["id"], target_port=8081, subdomain="hostile")
        yield vm


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def links(pid: int) -> list[str]:
    """Where hatchd's descriptors point."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile
    return found


def fds(pid: int) -> int:
    return len(links(pid))


def sockets(pid: int) -> int:
    return sum(link.startswith("socket:[") for link in links(pid))


def proxy_clients(pid: int, port: int) -> int:
    """Client connections hatchd has accepted on its proxy port: its sockets (by inode) that
    /proc/net/tcp shows established with that local port."""
    inodes = {link[8:-1] for link in links(pid) if link.startswith("socket:[")}
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        count += local_port == port and fields[3] == "01" and fields[9] in inodes
    return count


def request(path: str, host: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}.hatch.local\r\n{extra}\r\n".encode()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def status_of(answer: bytes) -> tuple[int | None, str]:
    """(status, JSON error) of a raw answer; (None, "") when the proxy just closed."""
    if not answer:
        return None, ""
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    try:
        return status, json.loads(body).get("error", "")
    except ValueError:
        return status, ""


async def ask(port: int, source: str, path: str = "/", host: str = "web") -> tuple[int | None, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(request(path, host, extra="Connection: close\r\n"))
    try:
        return status_of(await asyncio.wait_for(read_all(reader), 30))
    finally:
        writer.close()


async def flooder(port: int, source: str, kind: str) -> tuple[str, int | None]:
    """One hostile connection; what the proxy answered before it closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    trickle = None
    if kind == "slowloris":
        writer.write(request("/", "web").removesuffix(b"\r\n"))  # never the empty line
        trickle = asyncio.create_task(trickle_bytes(writer))
    elif kind == "half-closed":
        writer.write(b"GET / HTTP/1.1\r\nHost: web.hatch")
        writer.write_eof()
    elif kind == "stalled-body":
        writer.write(
            request("/upload", "hostile", "POST", "Content-Length: 100000\r\n") + b"x" * 99
        )
    try:
        answer = await asyncio.wait_for(read_all(reader), 60)
    finally:
        if trickle is not None:
            trickle.cancel()
        writer.close()
    return kind, status_of(answer)[0]


async def trickle_bytes(writer: asyncio.StreamWriter) -> None:
    """A header byte every half second: progress, but never a whole head."""
    try:
        while True:
            await asyncio.sleep(0.5)
            writer.write(b"X")
            await writer.drain()
    except ConnectionError:
        pass


def test_a_flood_of_bad_connections_is_bounded_and_the_rest_is_served(
    hatch: HatchDaemon, guest: dict
) -> None:
    assert hatch.proc is not None
    pid, port = hatch.proc.pid, hatch.proxy_port
    asyncio.run(flood(hatch, pid, port))


async def flood(hatch: HatchDaemon, pid: int, port: int) -> None:
    assert await ask(port, "127.0.0.1") == (200, "")  # positive control, and a pooled connection
    base_fds, base_sockets, base_rss = fds(pid), sockets(pid), rss_kib(pid)

    # 100 from each of three addresses: 85 stay (the half-closed ones are closed at once),
    # and each stalled body holds a guest connection too.
    kinds = ["idle"] * 40 + ["slowloris"] * 40 + ["half-closed"] * 15 + ["stalled-body"] * 5
    sources = ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    tasks = [
        asyncio.create_task(flooder(port, source, kind)) for source in sources for kind in kinds
    ]
    half_closed = [t for t, k in zip(tasks, kinds * 3, strict=True) if k == "half-closed"]
    await asyncio.wait_for(asyncio.gather(*half_closed), 30)

    def state() -> str:
        ended = Counter(t.result() for t in tasks if t.done() and not t.exception())
        return f"{clients()} clients, {fds(pid)} fds (at first {base_fds}); ended {dict(ended)}"

    def clients() -> int:
        return proxy_clients(pid, port)

    await until(lambda: clients() >= 3 * 85, "the flood to be held", 30, state)

    async with httpx.AsyncClient(timeout=30) as client:
        health = await client.get(hatch.url + "/healthz")
        assert health.status_code == 200, "the API answers during the flood"
    assert await ask(port, "127.0.0.1") == (200, "")  # another client is served
    assert (await ask(port, "127.0.0.2", host="nosuch"))[0] == 404

    tasks += [asyncio.create_task(flooder(port, "127.0.1.1", "idle")) for _ in range(15)]
    await until(lambda: clients() >= 3 * 85 + 15, "the first address to hold 100", 30, state)
    status, message = await ask(port, "127.0.1.1")
    assert status == 429 and message == "too many connections from 127.0.1.1 (limit 100)"

    for source in ["127.0.2.1", "127.0.2.2"]:  # up to the total: 100 + 85 + 85 + 2 x 65 = 400
        tasks += [asyncio.create_task(flooder(port, source, "idle")) for _ in range(65)]
    await until(lambda: clients() >= 400, "the total to be reached", 30, state)
    status, message = await ask(port, "127.0.3.1")
    assert status == 503 and message == "the proxy is at its limit of 400 connections"
    peak_fds, peak_rss, peak_clients = fds(pid), rss_kib(pid), clients()

    outcomes = Counter(await asyncio.wait_for(asyncio.gather(*tasks), 90))
    assert outcomes == {
        ("idle", None): 40 * 3 + 15 + 65 * 2,  # a connection that says nothing is just closed
        ("slowloris", 408): 40 * 3,
        ("half-closed", None): 15 * 3,
        ("stalled-body", 408): 5 * 3,
    }
    await until(lambda: clients() == 0, "every flood connection to be closed", 30, state)
    # The database's connection pool may have grown meanwhile: sockets are what must go.
    await until(lambda: sockets(pid) <= base_sockets + 2, "hatchd's sockets to go", 30, state)
    assert await ask(port, "127.0.1.1") == (200, "")  # the flooding address is served again
    grown_mib = (peak_rss - base_rss) / 1024
    print(
        f"flood: {len(tasks)} connections, {peak_clients} held at the peak, "
        f"fds {base_fds} -> {peak_fds}, VmRSS +{grown_mib:.1f} MiB"
    )
    assert peak_clients == 400
    # Clients, their guest connections, and the database's pool (up to 15 connections).
    assert peak_fds <= base_fds + 400 + 3 * 5 + 32
    assert grown_mib < 48, f"hatchd grew by {grown_mib:.0f} MiB holding 400 connections"


async def until(
    condition: Callable[[], bool], what: str, timeout: float, state: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}" + (
            f" ({state()})"
        )
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("path", ["/endless-head", "/endless-value"])
def test_a_guest_whose_response_head_never_ends_gets_502(
    hatch: HatchDaemon, guest: dict, path: str
) -> None:
    assert hatch.proc is not None
    before = rss_kib(hatch.proc.pid)
    url = f"http://127.0.0.1:{hatch.proxy_port}{path}"
    began = time.monotonic()
    response = httpx.get(url, headers={"Host": "hostile.hatch.local"}, timeout=30)
    took = time.monotonic() - began
    assert response.status_code == 502
    assert response.json()["error"] == "the target's response head is larger than 64 KiB"
    grown_mib = (rss_kib(hatch.proc.pid) - before) / 1024
    print(f"{path}: 502 after {took:.2f}s, VmRSS {grown_mib:+.1f} MiB")
    assert grown_mib < 16, f"hatchd grew by {grown_mib:.0f} MiB reading a hostile head"
    good = httpx.get(f"http://127.0.0.1:{hatch.proxy_port}/", headers={"Host": "web.hatch.local"})
    assert good.status_code == 200


def test_a_guest_that_stalls_mid_response_is_cut_off(hatch: HatchDaemon, guest: dict) -> None:
    url = f"http://127.0.0.1:{hatch.proxy_port}/stall"
    began = time.monotonic()
    with httpx.stream("GET", url, headers={"Host": "hostile.hatch.local"}, timeout=30) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):  # cut off, not left hanging
            response.read()
    print(f"/stall: cut off after {time.monotonic() - began:.2f}s (upstream timeout 5 s)")


def proxied_text(hatch: HatchDaemon, subdomain: str, path: str) -> str | None:
    response = httpx.get(
        f"http://127.0.0.1:{hatch.proxy_port}{path}",
        headers={"Host": f"{subdomain}.hatch.local"},
        timeout=10,
    )
    return response.text if response.status_code == 200 else None


def attempts_of(hatch: HatchDaemon, vm_id: str) -> int:
    return len(hatch.events("waking vm from its latest snapshot", vm_id))


def test_a_wake_that_keeps_failing_backs_off_then_puts_the_vm_in_error(hatch: HatchDaemon) -> None:
    with hatch.client(hatch.create_key("bob")) as api:
        vm = api.create_vm(user_data="#!/bin/sh\nbusybox httpd -p 8080 -h /\n", mem_mib=256)
        api.create_route(vm["id"], target_port=8080, subdomain="broken")
        api.snapshot_vm(vm["id"], wait_stored=True)
        # The snapshot's chunks are gone, and so is the VM's own copy of it.
        shutil.rmtree(hatch.data_dir / "snapshots" / "users" / namespace("bob"))
        shutil.rmtree(hatch.data_dir / "vms" / vm["id"] / "resume")

        def proxied() -> tuple[int, str]:
            response = httpx.get(
                f"http://127.0.0.1:{hatch.proxy_port}/",
                headers={"Host": "broken.hatch.local"},
                timeout=60,
            )
            return response.status_code, response.json()["error"]

        status, first = proxied()
        assert status == 503 and first.startswith(f"waking vm {vm['id']} failed: ")
        assert "cannot be restored" in first and first.endswith("next attempt in 2s")
        status, second = proxied()
        assert status == 503 and f"waking vm {vm['id']} failed once (last: " in second
        assert attempts_of(hatch, vm["id"]) == 1  # the second request did not try again

        asked = 2
        while api.get_vm(vm["id"])["state"] != "error":
            assert asked < 2000, "the vm never went to error"
            assert proxied()[0] == 503
            asked += 1
        assert attempts_of(hatch, vm["id"]) == 3  # 2 s, then 4 s apart: 3 tries for all
        assert asked > 10
        print(f"wake: {asked} requests, 3 attempts, then error")
        state = api.get_vm(vm["id"])
        assert state["state_reason"].startswith("waking failed 3 times in a row, last: ")
        status, message = proxied()
        assert (status, message) == (503, f"vm {vm['id']} is in error: {state['state_reason']}")
        assert attempts_of(hatch, vm["id"]) == 3  # in error: not tried again

        # The way out keeps the VM: a cold boot from its disk, and its route answers again.
        started = api.start_vm(vm["id"])
        assert (started["state"], started["state_reason"]) == ("running", None)
        hostname = wait_for(
            lambda: proxied_text(hatch, "broken", "/etc/hostname"), 120, "the route to answer again"
        )
        assert hostname.strip() == vm["id"].replace("_", "-")
