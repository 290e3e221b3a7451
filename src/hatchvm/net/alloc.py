"""Pure allocation helpers; the database's unique columns make the choices stick."""

from __future__ import annotations

import ipaddress
import secrets


def host_addresses(cidr: str) -> list[str]:
    """Usable guest addresses: the subnet's hosts minus the gateway (the bridge itself)."""
    iface = ipaddress.IPv4Interface(cidr)
    return [str(ip) for ip in iface.network.hosts() if ip != iface.ip]


def first_free_ip(cidr: str, used: set[str]) -> str | None:
    return next((ip for ip in host_addresses(cidr) if ip not in used), None)


def random_mac() -> str:
    """A locally administered unicast MAC (02:..)."""
    return "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))


def tap_name(prefix: str, vm_id: str) -> str:
    """TAP name for a VM: prefix + its random id part, cut to Linux's 15-character limit."""
    return (prefix + vm_id.split("_", 1)[-1])[:15]


def first_free_port(lo: int, hi: int, used: set[int]) -> int | None:
    return next((p for p in range(lo, hi + 1) if p not in used), None)
