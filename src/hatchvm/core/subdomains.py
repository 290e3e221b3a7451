"""Route subdomains: the seed's rules, its reserved names, and random ones."""

from __future__ import annotations

import re

from hatchvm.ids import random_token

SUBDOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
RESERVED = frozenset(
    """api www admin app dashboard mail smtp ftp ssh ns1 ns2 status docs help support billing
    login auth oauth cdn static assets media hatch console panel grafana prometheus traefik
    minio postgres db redis internal""".split()
)
RANDOM_LENGTH = 12


def subdomain_problem(name: str) -> str | None:
    """Why name cannot be a subdomain, or None if it can."""
    if not name:
        return "must not be empty"
    if len(name) > 63:
        return f"must be at most 63 characters (got {len(name)})"
    if name != name.lower():
        return "must be lowercase"
    if name.startswith("-") or name.endswith("-"):
        return "must not start or end with a hyphen"
    if not SUBDOMAIN.fullmatch(name):  # match() would let "name\n" through: $ allows it
        return "may only contain lowercase letters, digits and hyphens"
    if name in RESERVED:
        return f"{name!r} is reserved"
    return None


def random_subdomain() -> str:
    """12 random lowercase letters/digits; never reserved (none is 12 characters long)."""
    return random_token(RANDOM_LENGTH)
