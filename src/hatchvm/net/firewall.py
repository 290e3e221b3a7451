"""hatchd's own nftables tables: NAT for the guests and isolation between them.

Everything is applied as one `nft -f` transaction that deletes and recreates our tables, so
applying is idempotent and start-up reconciliation is a single call. Nothing outside our
tables is touched. Each running guest then gets one element in the `guests` set: the only
MAC and IPv4 address its TAP may send from.
"""

from __future__ import annotations

import ipaddress
import subprocess

from hatchvm.net.errors import NetworkError

GUESTS_SET = "guests"


def _nft(script: str) -> str:
    try:
        result = subprocess.run(
            ["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise NetworkError("the nft command is not installed (Debian package nftables)") from None
    if result.returncode != 0:
        raise NetworkError(f"nft failed: {result.stderr.strip()}")
    return result.stdout


def ruleset(table: str, bridge: str, cidr: str, tap_prefix: str) -> str:
    subnet = ipaddress.IPv4Interface(cidr).network
    return f"""
table ip {table} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != "{bridge}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{bridge}" oifname "{bridge}" drop
        iifname "{bridge}" ip saddr != {subnet} drop
        iifname "{bridge}" accept
        oifname "{bridge}" ct state established,related accept
        oifname "{bridge}" drop
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


def allow_guest(table: str, tap: str, mac: str, ip: str) -> None:
    """Let the guest on `tap` send from its own MAC and address (idempotent)."""
    _nft("add " + _guest_element(table, tap, mac, ip))


def forget_guest(table: str, tap: str, mac: str, ip: str) -> None:
    """Idempotent: adding first makes the deletion safe when the element is absent."""
    element = _guest_element(table, tap, mac, ip)
    _nft("add " + element + "delete " + element)


def _delete_tables(table: str) -> str:
    return "".join(
        f"table {family} {table}\ndelete table {family} {table}\n" for family in ("ip", "bridge")
    )


def apply_rules(table: str, bridge: str, cidr: str, tap_prefix: str) -> None:
    """(Re)create our tables atomically: declaring then deleting makes deletion safe when absent."""
    _nft(_delete_tables(table) + ruleset(table, bridge, cidr, tap_prefix))


def remove_rules(table: str) -> None:
    _nft(_delete_tables(table))


def list_tables() -> list[str]:
    out = _nft_list(["nft", "list", "tables"])
    return [" ".join(line.split()[1:]) for line in out.splitlines() if line.startswith("table ")]


def rules_present(table: str) -> bool:
    return any(entry.split()[-1] == table for entry in list_tables())


def _nft_list(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetworkError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result.stdout
