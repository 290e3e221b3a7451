"""The guests' egress policy: which destinations beyond the host a guest may reach.

The internet is allowed; the ranges below are not, because behind them lie the host's LAN, a
cloud's metadata service, the carrier's NAT, or nothing a guest has business with. The operator
punches exceptions through them (allow) and adds more denials (deny, which wins over allow).
The guests' DNS servers stay reachable on port 53 whatever the lists say: hatchd itself tells
the guests to use them. The host's own addresses are not part of this policy: traffic to them
never leaves the host, and the firewall's input chain refuses it all (net/firewall.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network


class Egress(StrEnum):
    """A VM's choice (the API's `egress`). Neither reaches the host itself."""

    INTERNET = "internet"  # the internet, under the policy below
    NONE = "none"  # nothing beyond the host; the host still reaches the guest


DEFAULT_DENIED: tuple[IPv4Network, ...] = tuple(
    IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # private (RFC 1918): the host's LAN
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local: cloud metadata services (169.254.169.254)
        "172.16.0.0/12",  # private (RFC 1918)
        "192.168.0.0/16",  # private (RFC 1918)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the limited broadcast 255.255.255.255
    )
)


@dataclass(frozen=True)
class EgressPolicy:
    """The operator's part of the policy (HATCH_GUEST_DNS, HATCH_EGRESS_*_CIDRS)."""

    dns: tuple[IPv4Address, ...] = ()
    allow: tuple[IPv4Network, ...] = ()
    deny: tuple[IPv4Network, ...] = ()


def nft_elements(items: Iterable[IPv4Address | IPv4Network]) -> str:
    """'elements = { ... }' for an nft set declaration, or '' when there are none.

    Networks are merged first: an nft interval set refuses overlapping elements."""
    nets = [IPv4Network(i) if isinstance(i, IPv4Address) else i for i in items]
    merged = [str(n) for n in ipaddress.collapse_addresses(nets)]
    return f"elements = {{ {', '.join(merged)} }}" if merged else ""
