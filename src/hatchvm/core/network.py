"""Host-side networking as the lifecycle sees it: async wrappers over the root-only net calls."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from hatchvm.config import Settings
from hatchvm.db.models import VM
from hatchvm.net import firewall, links
from hatchvm.net.egress import Egress, EgressPolicy

log = structlog.get_logger("hatchvm.net")


@dataclass(frozen=True)
class GuestLink:
    """A networked VM's place on the bridge, and whether its traffic may leave the host."""

    tap: str
    mac: str
    ip: str
    internet: bool

    @classmethod
    def of(cls, vm: VM) -> GuestLink | None:
        if vm.tap_name and vm.guest_mac and vm.guest_ip:
            return cls(vm.tap_name, vm.guest_mac, vm.guest_ip, vm.egress == Egress.INTERNET)
        return None


class HostNetwork:
    """The bridge, hatchd's nftables table and one TAP per running VM."""

    def __init__(self, settings: Settings) -> None:
        self._s = settings

    @property
    def gateway(self) -> str:
        return str(self._s.bridge_interface.ip)

    @property
    def gateway_mac(self) -> str:
        """The bridge's MAC: fixed by its address (links.bridge_mac), so guests may be told it."""
        return links.bridge_mac(self._s.bridge_interface.ip)

    @property
    def prefixlen(self) -> int:
        return self._s.bridge_interface.network.prefixlen

    async def setup(self) -> None:
        """Idempotent: bridge, forwarding, rules. Run at every daemon start (reconciliation)."""
        s = self._s
        await asyncio.to_thread(links.ensure_bridge, s.bridge_name, s.bridge_cidr)
        await asyncio.to_thread(links.enable_ip_forwarding)
        egress = EgressPolicy(
            dns=tuple(s.guest_dns_servers),
            allow=tuple(s.egress_allow_networks),
            deny=tuple(s.egress_deny_networks),
        )
        await asyncio.to_thread(
            firewall.apply_rules, s.nft_table, s.bridge_name, s.bridge_cidr, s.tap_prefix, egress
        )
        log.info(
            "network ready",
            bridge=s.bridge_name,
            cidr=s.bridge_cidr,
            table=s.nft_table,
            egress_allow=s.egress_allow_cidrs,
            egress_deny=s.egress_deny_cidrs,
        )

    async def attach(self, link: GuestLink, plugged: bool = True) -> None:
        """The guest's TAP on the bridge, the only MAC and address it may send from, its egress,
        and the host's permanent neighbour entry for it. Idempotent. Unplugged, the TAP is
        down until plug(): nothing the guest sends leaves, while the guest itself sees no
        change of its link (a carrier going off and on again would make its kernel drop what it
        sends until it has noticed, such as the answer to a first connection)."""
        await asyncio.to_thread(self._attach, link, plugged)  # one hop: it is on the wake path

    async def plug(self, link: GuestLink) -> None:
        await asyncio.to_thread(links.plug_tap, link.tap)

    def _attach(self, link: GuestLink, plugged: bool) -> None:
        s = self._s
        links.ensure_tap(link.tap, s.bridge_name, up=plugged)
        firewall.allow_guest(s.nft_table, link.tap, link.mac, link.ip, link.internet)
        links.pin_neighbour(s.bridge_name, link.ip, link.mac)

    async def detach(self, link: GuestLink) -> None:
        """Undo attach (idempotent): a stopped guest's address is answered by nobody."""
        s = self._s
        await asyncio.to_thread(links.unpin_neighbour, s.bridge_name, link.ip)
        await asyncio.to_thread(firewall.forget_guest, s.nft_table, link.tap, link.mac, link.ip)
        await asyncio.to_thread(links.delete_link, link.tap)

    async def settle(self, running: list[GuestLink]) -> list[str]:
        """At start-up: attach the running guests again (setup emptied the firewall's sets) and
        delete TAPs and neighbour pins that no running VM owns. Returns the deleted TAPs."""
        s = self._s
        for link in running:
            await self.attach(link)
        keep_taps = {link.tap for link in running}
        names = await asyncio.to_thread(links.list_links, s.tap_prefix)
        stale = [n for n in names if n not in keep_taps and n != s.bridge_name]
        for name in stale:
            await asyncio.to_thread(links.delete_link, name)
        keep_ips = {link.ip for link in running}
        for ip in await asyncio.to_thread(links.pinned_neighbours, s.bridge_name):
            if ip not in keep_ips:
                await asyncio.to_thread(links.unpin_neighbour, s.bridge_name, ip)
        return stale
