"""How many connections the proxy holds, in total and per client address.

A direct client counts by its own address (an IPv6 client by its /64: one host there has
billions of addresses). A trusted edge proxy's connections count only in the total, since it
carries many clients; each request it forwards counts against the client address it names,
for as long as the request (or its tunnel) lasts.
"""

from __future__ import annotations

import resource
from collections import Counter

import structlog

log = structlog.get_logger("hatchvm.limits")

FD_RESERVE = 512  # descriptors kept for everything else hatchd opens (database, VMs, SSH)


def capped_by_fd_budget(total: int, who: str) -> int:
    """total connections, lowered (with a warning) to what the open-file limit allows."""
    budget = fd_budget()
    if total <= budget:
        return total
    log.warning(
        f"{who} connection limit lowered to what the open-file limit allows",
        configured=total,
        allowed=budget,
    )
    return budget


def fd_budget() -> int:
    """Client connections the open-file limit allows: each may hold a guest connection too."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, (soft - FD_RESERVE) // 2)


class Admission:
    def __init__(self, total: int, per_address: int, name: str = "the proxy") -> None:
        self.total = total
        self.per_address = per_address
        self.name = name  # who refuses, in the refusal's message
        self.open = 0
        self._by_key: Counter[str] = Counter()

    def admit(self, key: str | None) -> tuple[int, str] | None:
        """Count a new connection (key None: a trusted proxy's); the refusal if over a limit."""
        if self.open >= self.total:
            return 503, f"{self.name} is at its limit of {self.total} connections"
        if key is not None:
            if self._by_key[key] >= self.per_address:
                return 429, f"too many connections from {key} (limit {self.per_address})"
            self._by_key[key] += 1
        self.open += 1
        return None

    def release(self, key: str | None) -> None:
        self.open -= 1
        if key is not None:
            self.leave(key)

    def enter(self, key: str) -> tuple[int, str] | None:
        """Count a request forwarded by a trusted proxy for client key; the refusal if over."""
        if self._by_key[key] >= self.per_address:
            return 429, f"too many requests in progress from {key} (limit {self.per_address})"
        self._by_key[key] += 1
        return None

    def leave(self, key: str) -> None:
        self._by_key[key] -= 1
        if self._by_key[key] <= 0:
            del self._by_key[key]
