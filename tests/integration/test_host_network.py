"""The host side of a guest's network, without a guest: attach, detach and start-up settling
against the real kernel (inside the suite's namespace)."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from hatchvm.config import Settings
from hatchvm.core.network import GuestLink, HostNetwork
from hatchvm.net import firewall, links, nftlib
from hatchvm.net.errors import NetworkError
from tests.support.host import link_exists, link_info, pinned_addresses

pytestmark = pytest.mark.vm

BRIDGE, TABLE, PREFIX = "hbnet", "hatchnettest", "hbn"


def nft_set(family: str, name: str) -> str:
    out = subprocess.run(
        ["nft", "list", "set", family, TABLE, name], capture_output=True, text=True, check=True
    )
    return out.stdout


def guests_set() -> str:
    return nft_set("bridge", firewall.GUESTS_SET)


def online() -> set[str]:
    """The guest addresses allowed out (egress "internet")."""
    listing = nft_set("ip", firewall.INTERNET_SET)
    return set(re.findall(r"\b172\.31\.250\.\d+\b", listing))


@pytest.fixture
def net(tmp_path: Path) -> Iterator[HostNetwork]:
    settings = Settings(
        data_dir=tmp_path,
        bridge_name=BRIDGE,
        bridge_cidr="172.31.250.1/24",
        tap_prefix=PREFIX,
        nft_table=TABLE,
    )
    network = HostNetwork(settings)
    asyncio.run(network.setup())
    yield network
    firewall.remove_rules(TABLE)
    links.delete_link(BRIDGE)


def bridge_mac() -> str:
    return str(link_info(BRIDGE)["address"])


def test_attach_detach_and_settle(net: HostNetwork) -> None:
    a = GuestLink(f"{PREFIX}a", "02:11:22:33:44:55", "172.31.250.2", internet=True)
    b = GuestLink(f"{PREFIX}b", "02:11:22:33:44:66", "172.31.250.3", internet=False)
    mac = bridge_mac()
    assert mac == "02:00:ac:1f:fa:01"  # made from the gateway address, not from a port

    for _ in range(2):  # idempotent
        asyncio.run(net.attach(a))
        asyncio.run(net.attach(b))
    assert link_exists(a.tap) and link_exists(b.tap)
    assert pinned_addresses(BRIDGE) == {a.ip, b.ip}
    assert a.mac in guests_set() and b.ip in guests_set()
    assert online() == {a.ip}  # b has egress "none"
    assert bridge_mac() == mac  # ports came, the bridge's MAC stayed

    # Attaching again with another policy replaces it, both ways.
    asyncio.run(net.attach(replace(b, internet=True)))
    assert online() == {a.ip, b.ip}
    asyncio.run(net.attach(b))
    assert online() == {a.ip}

    for _ in range(2):
        asyncio.run(net.detach(a))
    assert not link_exists(a.tap) and link_exists(b.tap)
    assert pinned_addresses(BRIDGE) == {b.ip}
    assert a.mac not in guests_set() and b.mac in guests_set()
    assert online() == set()

    # A daemon start-up: the rules are made afresh (the set is empty), then settled to what
    # really runs. A leftover TAP and pin of a VM that no longer runs are cleared.
    asyncio.run(net.attach(a))
    b_online = replace(b, internet=True)
    asyncio.run(net.attach(b_online))
    asyncio.run(net.setup())
    assert b.mac not in guests_set() and online() == set()
    assert asyncio.run(net.settle([b_online])) == [a.tap]
    assert not link_exists(a.tap) and link_exists(b.tap)
    assert pinned_addresses(BRIDGE) == {b.ip}
    assert b.mac in guests_set() and a.mac not in guests_set()
    assert online() == {b.ip}
    assert bridge_mac() == mac


def test_nft_scripts_run_in_process_and_fail_with_nfts_message(net: HostNetwork) -> None:
    # The library and the nft command see the same kernel tables: what one adds the other lists.
    element = '"hbnz" . 02:00:00:00:00:01 . 172.31.250.9'
    nftlib.run(f"add element bridge {TABLE} {firewall.GUESTS_SET} {{ {element} }}")
    assert "172.31.250.9" in guests_set()
    assert f"bridge {TABLE}" in firewall.list_tables()
    assert firewall.rules_present(TABLE)
    with pytest.raises(NetworkError, match=r"nft failed: .*(No such file|does not exist)"):
        nftlib.run(f"add element bridge {TABLE} no_such_set {{ 172.31.250.9 }}")
    with pytest.raises(NetworkError, match=r"nft failed: .*syntax error"):
        nftlib.run("add elemnt bridge")
    firewall.remove_rules(TABLE)
    assert not firewall.rules_present(TABLE)
    assert (
        TABLE
        not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    )


def admin_up(name: str) -> bool:
    return "UP" in link_info(name)["flags"]


def test_a_fork_childs_tap_stays_down_until_it_is_plugged(net: HostNetwork) -> None:
    """A child is attached unplugged: its TAP is on the bridge, its addresses allowed and
    pinned, but down (nothing it sends leaves) until plug(); the guest's own link is never
    touched. The gateway MAC a child is told is the bridge's."""
    child = GuestLink(f"{PREFIX}c", "02:11:22:33:44:77", "172.31.250.4", internet=False)
    asyncio.run(net.attach(child, plugged=False))
    assert link_exists(child.tap) and not admin_up(child.tap)
    assert link_info(child.tap)["master"] == BRIDGE
    assert child.mac in guests_set() and pinned_addresses(BRIDGE) == {child.ip}
    asyncio.run(net.plug(child))
    assert admin_up(child.tap)
    assert net.gateway_mac == bridge_mac()
    asyncio.run(net.detach(child))
    assert not link_exists(child.tap)
