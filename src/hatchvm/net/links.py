"""Bridge and TAP devices through pyroute2. Root-only; every function is idempotent.

pyroute2 is synchronous: the lifecycle calls these through asyncio.to_thread."""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hatchvm.net.errors import NetworkError


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def ensure_bridge(name: str, cidr: str) -> None:
    """The bridge exists, carries the gateway address and is up."""
    iface = ipaddress.IPv4Interface(cidr)
    try:
        with IPRoute() as ipr:
            idx = _index(ipr, name)
            if idx is None:
                ipr.link("add", ifname=name, kind="bridge")
                idx = _index(ipr, name)
            assert idx is not None
            have = {
                (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                for a in ipr.get_addr(index=idx, family=2)
            }
            if (str(iface.ip), iface.network.prefixlen) not in have:
                ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            ipr.link("set", index=idx, state="up")
    except NetlinkError as exc:
        raise NetworkError(f"cannot set up bridge {name} ({cidr}): {exc.args[-1]}") from None


def ensure_tap(tap: str, bridge: str) -> None:
    """A persistent TAP enslaved to the bridge and up; QEMU opens it by name."""
    try:
        with IPRoute() as ipr:
            br = _index(ipr, bridge)
            if br is None:
                raise NetworkError(f"bridge {bridge} does not exist")
            idx = _index(ipr, tap)
            if idx is None:
                ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
                idx = _index(ipr, tap)
            assert idx is not None
            ipr.link("set", index=idx, master=br, state="up")
    except NetlinkError as exc:
        raise NetworkError(f"cannot set up TAP {tap} on {bridge}: {exc.args[-1]}") from None


def delete_link(name: str) -> None:
    try:
        with IPRoute() as ipr:
            idx = _index(ipr, name)
            if idx is not None:
                ipr.link("del", index=idx)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise NetworkError(f"cannot delete link {name}: {exc.args[-1]}") from None


def list_links(prefix: str) -> list[str]:
    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return sorted(n for n in names if n and n.startswith(prefix))


def enable_ip_forwarding() -> None:
    """Guests reach the outside through NAT, which needs forwarding (per network namespace)."""
    try:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    except OSError as exc:
        raise NetworkError(f"cannot enable IPv4 forwarding: {exc}") from None
