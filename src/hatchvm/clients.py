"""Who a client is, for limits: its IP address, an IPv6 client by its /64 (one host there has
billions of addresses to spread over)."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> IPAddress | None:
    """An address as a socket or X-Forwarded-For gives it; IPv4-mapped IPv6 as IPv4."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def address_key(address: IPAddress) -> str:
    """What one client is: an IPv4 address, or an IPv6 /64."""
    if address.version == 4:
        return str(address)
    return str(ipaddress.IPv6Network((address, 64), strict=False))
