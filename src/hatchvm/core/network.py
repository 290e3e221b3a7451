"""Host-side networking as the lifecycle sees it: async wrappers over the root-only net calls."""

from __future__ import annotations

import asyncio

import structlog

from hatchvm.config import Settings
from hatchvm.net import firewall, links

log = structlog.get_logger("hatchvm.net")


class HostNetwork:
    """The bridge, hatchd's nftables table and one TAP per running VM."""

    def __init__(self, settings: Settings) -> None:
        self._s = settings

    @property
    def gateway(self) -> str:
        return str(self._s.bridge_interface.ip)

    @property
    def prefixlen(self) -> int:
        return self._s.bridge_interface.network.prefixlen

    async def setup(self) -> None:
        """Idempotent: bridge, forwarding, rules. Run at every daemon start (reconciliation)."""
        s = self._s
        await asyncio.to_thread(links.ensure_bridge, s.bridge_name, s.bridge_cidr)
        await asyncio.to_thread(links.enable_ip_forwarding)
        await asyncio.to_thread(
            firewall.apply_rules, s.nft_table, s.bridge_name, s.bridge_cidr, s.tap_prefix
        )
        log.info("network ready", bridge=s.bridge_name, cidr=s.bridge_cidr, table=s.nft_table)

    async def add_tap(self, tap: str) -> None:
        await asyncio.to_thread(links.ensure_tap, tap, self._s.bridge_name)

    async def remove_tap(self, tap: str) -> None:
        await asyncio.to_thread(links.delete_link, tap)

    async def prune_taps(self, keep: set[str]) -> list[str]:
        """Delete TAPs with our prefix that no running VM owns; return their names."""
        names = await asyncio.to_thread(links.list_links, self._s.tap_prefix)
        stale = [n for n in names if n not in keep and n != self._s.bridge_name]
        for name in stale:
            await self.remove_tap(name)
        return stale
