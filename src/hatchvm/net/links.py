"""Bridge and TAP devices through pyroute2. Root-only; every function is idempotent.

pyroute2 is synchronous: the lifecycle calls these through asyncio.to_thread."""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import states as neighbour_states

from hatchvm.net.errors import NetworkError


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _bridge_index(ipr: IPRoute, bridge: str) -> int:
    found = _index(ipr, bridge)
    if found is None:
        raise NetworkError(f"bridge {bridge} does not exist")
    return found


def bridge_mac(gateway: ipaddress.IPv4Address) -> str:
    """A fixed, locally administered MAC for the bridge, made from its address.

    Left alone, a bridge takes the lowest MAC among its ports, so it changes whenever a VM's
    TAP comes or goes, and every guest's cached gateway entry goes stale: replies then go
    to a MAC nobody has until the guest asks (ARP) again."""
    return "02:00:" + ":".join(f"{b:02x}" for b in gateway.packed)


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
            ipr.link("set", index=idx, address=bridge_mac(iface.ip), state="up")
    except NetlinkError as exc:
        raise NetworkError(f"cannot set up bridge {name} ({cidr}): {exc.args[-1]}") from None


def ensure_tap(tap: str, bridge: str, up: bool = True) -> None:
    """A persistent TAP enslaved to the bridge, up unless asked otherwise; QEMU opens it by
    name. A TAP that is down drops whatever its guest sends (plug_tap brings it up)."""
    try:
        with IPRoute() as ipr:
            br = _bridge_index(ipr, bridge)
            idx = _index(ipr, tap)
            if idx is None:
                ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
                idx = _index(ipr, tap)
            assert idx is not None
            ipr.link("set", index=idx, master=br, state="up" if up else "down")
    except NetlinkError as exc:
        raise NetworkError(f"cannot set up TAP {tap} on {bridge}: {exc.args[-1]}") from None


def plug_tap(tap: str) -> None:
    """Bring a TAP made down (ensure_tap up=False) up: its guest's frames reach the bridge."""
    try:
        with IPRoute() as ipr:
            idx = _index(ipr, tap)
            if idx is None:
                raise NetworkError(f"TAP {tap} does not exist")
            ipr.link("set", index=idx, state="up")
    except NetlinkError as exc:
        raise NetworkError(f"cannot bring TAP {tap} up: {exc.args[-1]}") from None


def delete_link(name: str) -> None:
    try:
        with IPRoute() as ipr:
            idx = _index(ipr, name)
            if idx is not None:
                ipr.link("del", index=idx)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise NetworkError(f"cannot delete link {name}: {exc.args[-1]}") from None


def pin_neighbour(bridge: str, ip: str, mac: str) -> None:
    """A permanent neighbour entry for a guest: the host never asks (ARP) who has its address,
    so no other guest can answer, and the first packet after a wake goes out at once."""
    try:
        with IPRoute() as ipr:
            ipr.neigh(
                "replace",
                dst=ip,
                lladdr=mac,
                ifindex=_bridge_index(ipr, bridge),
                state=neighbour_states["permanent"],
            )
    except NetlinkError as exc:
        raise NetworkError(f"cannot pin {ip} to {mac} on {bridge}: {exc.args[-1]}") from None


def unpin_neighbour(bridge: str, ip: str) -> None:
    try:
        with IPRoute() as ipr:
            br = _index(ipr, bridge)
            if br is not None:
                ipr.neigh("del", dst=ip, ifindex=br)
    except NetlinkError as exc:
        if exc.code != errno.ENOENT:
            raise NetworkError(f"cannot unpin {ip} on {bridge}: {exc.args[-1]}") from None


def pinned_neighbours(bridge: str) -> list[str]:
    """The addresses pinned on the bridge (by this daemon or an earlier one)."""
    with IPRoute() as ipr:
        br = _index(ipr, bridge)
        if br is None:
            return []
        entries = ipr.get_neighbours(ifindex=br, family=2)
    permanent = neighbour_states["permanent"]
    return sorted(str(e.get_attr("NDA_DST")) for e in entries if e["state"] & permanent)


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
