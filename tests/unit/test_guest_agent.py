"""The guest agent's C parser, compiled as the image builder does and run on the host with
`--stdio`: it answers what it understands, refuses the rest with ERROR frames, and survives
any input. It runs without privileges here, so a sync can never touch the host's clock."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from hatchvm.agent.errors import AgentRefused
from hatchvm.agent.identity import Address, identity_fields
from hatchvm.agent.messages import (
    check_reply,
    hello_request,
    parse_hello,
    parse_ping,
    ping_request,
    sync_request,
)
from hatchvm.agent.protocol import (
    END,
    HEADER,
    REPLY,
    VERSION,
    ErrorCode,
    Frame,
    MsgType,
    Tag,
    decode,
    encode,
    int_field,
    text_field,
)
from hatchvm.images.builder import AGENT_CFLAGS, AGENT_NAME, AGENT_SOURCE

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")

# Root gives up every privilege first: a sync must fail with EPERM, never set the host's clock.
UNPRIVILEGED = (
    ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    if os.geteuid() == 0
    else []
)


@pytest.fixture(scope="module")
def agent() -> Iterator[Path]:
    # Not under pytest's private temp dir: the unprivileged user must be able to run it.
    out = Path(tempfile.mkdtemp(prefix="hatch-agent-"))
    try:
        out.chmod(0o755)
        source = out / "hatch-agent.c"
        source.write_bytes(
            resources.files("hatchvm.images").joinpath("guest", *AGENT_SOURCE).read_bytes()
        )
        binary = out / "hatch-agent"
        subprocess.run(["gcc", *AGENT_CFLAGS, "-o", str(binary), str(source)], check=True)
        yield binary
    finally:
        shutil.rmtree(out, ignore_errors=True)


def talk(agent: Path, data: bytes) -> list[Frame]:
    """Feed data on stdin until EOF; every frame the agent wrote (all must parse) after the
    hello it says unasked when it starts."""
    done = subprocess.run(
        [*UNPRIVILEGED, str(agent), "--stdio"], input=data, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return answers(done.stdout)


def answers(out: bytes) -> list[Frame]:
    """The frames in what the agent wrote (all must parse), after its unasked hello."""
    frames = []
    while out:
        result = decode(out)
        assert result is not None, f"a truncated frame from the agent: {out[:40]!r}"
        frames.append(result[0])
        out = out[result[1] :]
    announced = frames.pop(0)
    assert (announced.type, announced.id) == (MsgType.HELLO | REPLY, 0)
    return frames


def request(kind_fields: tuple[int, tuple[tuple[int, bytes], ...]], request_id: int) -> bytes:
    kind, fields = kind_fields
    return encode(Frame(kind, request_id, fields))


def test_version(agent: Path) -> None:
    out = subprocess.run([str(agent), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout == f"{AGENT_NAME} (protocol 1)\n"  # the name the image's manifest says


def test_hello_and_ping(agent: Path) -> None:
    hello, pong = talk(agent, request(hello_request("t"), 1) + request(ping_request(b"abc"), 2))
    assert (hello.id, pong.id) == (1, 2)
    assert hello.flags == END and pong.flags == END
    assert parse_hello(hello).capabilities == {"ping", "sync", "exec", "files", "identity"}
    assert parse_hello(hello).version == VERSION
    assert parse_ping(pong) == b"abc"


def test_a_sync_without_privileges_reports_why(agent: Path) -> None:
    (answer,) = talk(agent, request(sync_request(1, b"e" * 64), 7))
    with pytest.raises(AgentRefused, match="clock_settime: Operation not permitted") as err:
        check_reply(MsgType.SYNC, answer)
    assert err.value.code == ErrorCode.FAILED
    assert "RNDADDENTROPY: Operation not permitted" in str(err.value)


@pytest.mark.parametrize(
    "fields",
    [
        (),  # nothing
        (int_field(Tag.TIME_NS, 1),),  # no entropy
        (int_field(Tag.TIME_NS, 1), (Tag.ENTROPY, b"e" * 15)),  # too little
        (int_field(Tag.TIME_NS, 1), (Tag.ENTROPY, b"e" * 513)),  # too much
        ((Tag.TIME_NS, b"\x01"), (Tag.ENTROPY, b"e" * 64)),  # not an integer
    ],
)
def test_a_bad_sync_is_refused_before_anything_is_touched(
    agent: Path, fields: tuple[tuple[int, bytes], ...]
) -> None:
    (answer,) = talk(agent, encode(Frame(MsgType.SYNC, 3, fields)))
    assert (answer.type, answer.id) == (MsgType.ERROR, 3)
    assert answer.get_int(Tag.CODE) == ErrorCode.BAD_FIELD


@pytest.mark.parametrize(
    "address",
    [None, Address(mac="52:54:00:12:34:56", cidr="172.16.0.9/24", gateway="172.16.0.1")],
)
def test_identity_without_privileges_changes_nothing_and_says_why(
    agent: Path, address: Address | None
) -> None:
    """Unprivileged (the host's tests), the first step fails and the agent stops there."""
    fields = identity_fields("vm-child", "0" * 32, address)
    (answer,) = talk(agent, encode(Frame(MsgType.IDENTITY, 5, fields)))
    with pytest.raises(AgentRefused, match="sethostname: Operation not permitted") as err:
        check_reply(MsgType.IDENTITY, answer)
    assert err.value.code == ErrorCode.FAILED and err.value.errno == 1


@pytest.mark.parametrize(
    "fields",
    [
        (),  # nothing
        (text_field(Tag.NAME, "vm-x"),),  # no machine id
        (text_field(Tag.NAME, "vm-x"), text_field(Tag.MACHINE_ID, "a"), text_field(Tag.ADDR, "x")),
        (text_field(Tag.NAME, "a" * 64), text_field(Tag.MACHINE_ID, "a")),  # name too long
        (text_field(Tag.NAME, "vm\nx"), text_field(Tag.MACHINE_ID, "a")),  # a line break
    ],
)
def test_a_bad_identity_is_refused_before_anything_is_touched(
    agent: Path, fields: tuple[tuple[int, bytes], ...]
) -> None:
    (answer,) = talk(agent, encode(Frame(MsgType.IDENTITY, 4, fields)))
    assert (answer.type, answer.id) == (MsgType.ERROR, 4)
    assert answer.get_int(Tag.CODE) == ErrorCode.BAD_FIELD


def test_unknown_types_versions_and_malformed_fields_are_answered(agent: Path) -> None:
    unknown = encode(Frame(0x42, 1))
    v2 = HEADER.pack(b"HV", 2, MsgType.PING, 2, END, 0, 3) + b"new"
    bad_fields = HEADER.pack(b"HV", VERSION, MsgType.PING, 3, END, 0, 4) + b"\x00\x04\x00\x00"
    answers = talk(agent, unknown + v2 + bad_fields + request(ping_request(b"ok"), 4))
    assert [(a.id, a.get_int(Tag.CODE)) for a in answers[:3]] == [
        (1, ErrorCode.UNSUPPORTED),
        (2, ErrorCode.VERSION),
        (3, ErrorCode.BAD_FIELD),
    ]
    assert parse_ping(answers[3]) == b"ok"


def test_garbage_is_skipped_to_the_next_frame(agent: Path) -> None:
    oversized = HEADER.pack(b"HV", VERSION, MsgType.PING, 9, END, 0, 65537)
    garbage = bytes(range(256)).replace(b"H", b"") * 40 + oversized
    answers = talk(agent, garbage + request(ping_request(b"after"), 5))
    complaints = [a for a in answers if a.type == MsgType.ERROR]
    assert complaints and all(a.id == 0 for a in complaints)
    assert complaints[0].get_int(Tag.CODE) == ErrorCode.BAD_FRAME
    assert parse_ping(answers[-1]) == b"after"


def test_random_input_never_crashes_it(agent: Path) -> None:
    rng = random.Random(99)
    parts = []
    for _ in range(400):
        if rng.random() < 0.3:  # a plausible header with random fields
            payload = rng.randbytes(rng.randrange(0, 200))
            kind = rng.choice([1, 2, 3, 0x7F, 0x81, rng.randrange(256)])
            parts.append(HEADER.pack(b"HV", VERSION, kind, rng.randrange(1 << 32), 1, 0, 0))
            parts[-1] = parts[-1][:12] + len(payload).to_bytes(4, "big") + payload
        else:
            parts.append(rng.randbytes(rng.randrange(1, 3000)))
    answers = talk(agent, b"".join(parts))
    assert answers  # it talked back, every frame well-formed (talk checks)
    for answer in answers:
        assert answer.version == VERSION and answer.flags == END


# As root, in namespaces of its own (hostname, mounts, pids) over a /etc of its own: the agent
# really makes a child its own there, and nothing of the host's is touched.
IN_NAMESPACES = ["unshare", "--uts", "--pid", "--fork", "--mount-proc"]
OWN_ETC = """set -e
mount -t tmpfs tmpfs /etc
mkdir /etc/dropbear
echo parent > /etc/hostname
: > /etc/dropbear/dropbear_ed25519_host_key
"$0" --stdio
echo "$(hostname) $(cat /etc/hostname) $(cat /etc/machine-id) keys:$(ls /etc/dropbear)" >&2
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root")
@pytest.mark.parametrize("window", [1, None])
def test_identity_answers_early_when_asked_and_writes_the_files(
    agent: Path, window: int | None
) -> None:
    fields = identity_fields("vm-child", "ab" * 16, None)
    if window is not None:  # hatchd from agent 5 on
        fields = (*fields, int_field(Tag.WINDOW, window))
    done = subprocess.run(
        [*IN_NAMESPACES, "sh", "-c", OWN_ETC, str(agent)],
        input=encode(Frame(MsgType.IDENTITY, 9, fields)),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    first = [(MsgType.IDENTITY | REPLY, 9, 0)] if window is not None else []
    assert [(f.type, f.id, f.flags) for f in answers(done.stdout)] == [
        *first,
        (MsgType.IDENTITY | REPLY, 9, END),
    ]
    assert done.stderr.decode().splitlines()[-1] == f"vm-child vm-child {'ab' * 16} keys:"


# In a network namespace of its own too, with a veth pair's end as its eth0: the agent gives
# it the child's MAC, address and route, and (agent 6) the gateway's neighbour entry.
OWN_NET = """set -e
mount -t tmpfs tmpfs /etc
mkdir /etc/dropbear
ip link add eth0 type veth peer name eth1
ip link set eth1 up
"$0" --stdio
ip -o link show eth0 >&2
ip -o -4 addr show eth0 >&2
ip -4 route show default >&2
cat /proc/net/arp >&2
"""
GATEWAY_MAC = "02:00:0a:00:00:01"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root")
@pytest.mark.parametrize("gateway_mac", [GATEWAY_MAC, None])
def test_identity_readdresses_eth0_and_resolves_the_gateway_when_told_its_mac(
    agent: Path, gateway_mac: str | None
) -> None:
    """Told the gateway's MAC, the agent leaves a resolved neighbour entry for it, so the
    child's first answer needs no ARP; not told (hatchd before agent 6), there is none."""
    address = Address("02:00:0a:00:00:07", "10.0.0.7/24", "10.0.0.1", gateway_mac)
    fields = identity_fields("vm-child", "cd" * 16, address)
    done = subprocess.run(
        [*IN_NAMESPACES, "--net", "sh", "-c", OWN_NET, str(agent)],
        input=encode(Frame(MsgType.IDENTITY, 3, fields)),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [(f.type, f.flags) for f in answers(done.stdout)] == [(MsgType.IDENTITY | REPLY, END)]
    report = done.stderr.decode()
    assert "link/ether 02:00:0a:00:00:07 " in report  # the probe sees what the agent set
    assert "inet 10.0.0.7/24 " in report
    assert "default via 10.0.0.1 dev eth0" in report
    arp = {line.split()[0]: line.split() for line in report.splitlines() if "eth0" in line}
    if gateway_mac is None:
        assert "10.0.0.1" not in arp
    else:
        _ip, _hw_type, flags, mac, _mask, device = arp["10.0.0.1"]
        assert (mac, device) == (gateway_mac, "eth0")
        assert int(flags, 16) & 0x2  # ATF_COM: resolved
