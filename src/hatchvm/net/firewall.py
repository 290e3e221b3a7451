"""hatchd's own nftables tables: NAT for the guests, isolation between them, from the host and
from what lies beyond it (the egress policy, net/egress.py).

Everything is applied as one nft transaction that deletes and recreates our tables, so
applying is idempotent and start-up reconciliation is a single call. Scripts run in-process
through libnftables (net/nftlib.py): a guest's elements are added on every wake. Nothing outside our
tables is touched. Each running guest then gets one element in the `guests` set: the only
MAC and IPv4 address its TAP may send from; and, with egress "internet", its address in the
`egress_internet` set.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from hatchvm.net import nftlib
from hatchvm.net.egress import DEFAULT_DENIED, EgressPolicy, nft_elements

GUESTS_SET = "guests"  # bridge table: the MAC and address each guest's TAP may send from
INTERNET_SET = "egress_internet"  # ip table: the guests that may reach the outside
DNS_SET = "guest_dns"
DENY_SET = "egress_deny"  # the operator's denials
ALLOW_SET = "egress_allow"  # the operator's exceptions to the default denials
DEFAULT_DENY_SET = "egress_default_deny"


def _nft(script: str) -> str:
    return nftlib.run(script)


def _policy_set(name: str, items: Iterable[IPv4Address | IPv4Network]) -> str:
    body = "".join(f"{p}; " for p in ("type ipv4_addr", "flags interval", nft_elements(items)) if p)
    return f"set {name} {{ {body}}}"


def ruleset(table: str, bridge: str, cidr: str, tap_prefix: str, egress: EgressPolicy) -> str:
    subnet = ipaddress.IPv4Interface(cidr).network
    # Refused traffic is answered (ICMP "administratively prohibited") rather than dropped:
    # software in the guest fails at once instead of hanging until its timeout.
    refuse = "reject with icmp type admin-prohibited"
    dns = "meta l4proto { tcp, udp } th dport 53"
    return f"""
table ip {table} {{
    # The guests whose traffic may leave the host (egress "internet"), by their address: the
    # bridge table below lets a guest send only from its own, so the address names the guest.
    set {INTERNET_SET} {{
        type ipv4_addr
    }}
    {_policy_set(DNS_SET, egress.dns)}
    {_policy_set(DENY_SET, egress.deny)}
    {_policy_set(ALLOW_SET, egress.allow)}
    {_policy_set(DEFAULT_DENY_SET, DEFAULT_DENIED)}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != "{bridge}" masquerade
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        # Frames the bridge delivers to the host reach its IP stack on the bridge itself.
        iifname "{bridge}" jump guest_to_host
        # A TAP outside the bridge (a failed enslave) skips the bridge's checks: nothing.
        iifname "{tap_prefix}*" drop
    }}
    chain guest_to_host {{
        # The host offers guests nothing: no address, no port, no ping. Replies to what the
        # host opened (proxy, SSH gateway) and their ICMP errors come back; the guests' DNS
        # servers are served only if the operator puts them on the host.
        ct state established,related accept
        ip saddr @{INTERNET_SET} ip daddr @{DNS_SET} {dns} accept
        {refuse}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{bridge}" oifname "{bridge}" drop
        iifname "{bridge}" jump egress
        iifname "{tap_prefix}*" drop
        oifname "{bridge}" ct state established,related accept
        oifname "{bridge}" drop
    }}
    chain egress {{
        # Checked on every packet, not only a connection's first: a policy change holds at once.
        # The DNS servers hatchd gives guests first, then the operator's denials, the operator's
        # exceptions, and the default denials (net/egress.py).
        ip saddr != @{INTERNET_SET} {refuse}
        ip daddr @{DNS_SET} {dns} accept
        ip daddr @{DENY_SET} {refuse}
        ip daddr @{ALLOW_SET} accept
        ip daddr @{DEFAULT_DENY_SET} {refuse}
        accept
    }}
}}
table bridge {table} {{
    set {GUESTS_SET} {{
        type ifname . ether_addr . ipv4_addr
    }}
    chain prerouting {{
        type filter hook prerouting priority filter; policy accept;
        # No spoofing: a guest sends IPv4 and ARP only from its own MAC and address. Checked
        # before the bridge learns the source MAC, so no guest can take over another's MAC or
        # address, not even while that VM is asleep and a wake is reaching for it.
        iifname != "{tap_prefix}*" accept
        iifname . ether saddr . ip saddr @{GUESTS_SET} accept
        iifname . ether saddr . arp saddr ip @{GUESTS_SET} \
            iifname . arp saddr ether . arp saddr ip @{GUESTS_SET} accept
        drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        # Guests must not talk to each other: traffic between two VM ports is switched at
        # layer 2 and never reaches the ip tables above.
        iifname "{tap_prefix}*" oifname "{tap_prefix}*" drop
    }}
}}
"""


def _guest_element(table: str, tap: str, mac: str, ip: str) -> str:
    return f'element bridge {table} {GUESTS_SET} {{ "{tap}" . {mac} . {ip} }}\n'


def _internet_element(table: str, ip: str) -> str:
    return f"element ip {table} {INTERNET_SET} {{ {ip} }}\n"


def _absent(element: str) -> str:
    """Idempotent deletion: adding first makes it safe when the element is absent."""
    return "add " + element + "delete " + element


def allow_guest(table: str, tap: str, mac: str, ip: str, internet: bool) -> None:
    """Let the guest on `tap` send from its own MAC and address, and out to the internet or
    not (idempotent; one transaction)."""
    outside = _internet_element(table, ip)
    egress = "add " + outside if internet else _absent(outside)
    _nft("add " + _guest_element(table, tap, mac, ip) + egress)


def forget_guest(table: str, tap: str, mac: str, ip: str) -> None:
    """Idempotent; one transaction."""
    _nft(_absent(_guest_element(table, tap, mac, ip)) + _absent(_internet_element(table, ip)))


def _delete_tables(table: str) -> str:
    return "".join(
        f"table {family} {table}\ndelete table {family} {table}\n" for family in ("ip", "bridge")
    )


def apply_rules(table: str, bridge: str, cidr: str, tap_prefix: str, egress: EgressPolicy) -> None:
    """(Re)create our tables atomically: declaring then deleting makes deletion safe when absent.
    The sets start empty: the running guests are allowed again one by one (allow_guest)."""
    _nft(_delete_tables(table) + ruleset(table, bridge, cidr, tap_prefix, egress))


def remove_rules(table: str) -> None:
    _nft(_delete_tables(table))


def list_tables() -> list[str]:
    out = _nft("list tables")
    return [" ".join(line.split()[1:]) for line in out.splitlines() if line.startswith("table ")]


def rules_present(table: str) -> bool:
    return any(entry.split()[-1] == table for entry in list_tables())
