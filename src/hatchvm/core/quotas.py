"""Per-user quotas: how many VMs one user may have, and how many vCPUs, MiB of memory and of
disk they hold together, and how much snapshot storage. A breach is a 403 naming the limit."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hatchvm.config import Settings
from hatchvm.errors import QuotaExceeded


@dataclass(frozen=True)
class Usage:
    """What one user's VMs hold now (all of them, whatever their state)."""

    vms: int
    vcpus: int
    mem_mib: int


def check_create(settings: Settings, usage: Usage, vcpu_count: int, mem_mib: int) -> None:
    """Refuse a new VM of this size when it would take the user past a limit."""
    limit = settings.max_vms_per_user
    if usage.vms >= limit:
        raise QuotaExceeded(f"vm limit reached ({usage.vms}/{limit})")
    _check_total("vcpu", usage.vcpus, vcpu_count, settings.max_vcpus_per_user, "")
    _check_total("memory", usage.mem_mib, mem_mib, settings.max_mem_mib_per_user, " MiB")
    disk = settings.vm_disk_mib  # every VM has one writable disk of this size
    _check_total("disk", usage.vms * disk, disk, settings.max_disk_mib_per_user, " MiB")


def _check_total(name: str, used: int, more: int, limit: int, unit: str) -> None:
    if used + more > limit:
        raise QuotaExceeded(f"{name} limit reached: {used} + {more}{unit} > {limit}{unit}")


def check_snapshot(settings: Settings, used_bytes: int) -> None:
    """Refuse a new snapshot once the user's stored snapshots take the limit (a snapshot's
    size is known only once it is stored, so the last one may go past it)."""
    limit = settings.max_snapshot_mib_per_user
    if used_bytes >= limit << 20:
        used = math.ceil(used_bytes / (1 << 20))
        raise QuotaExceeded(f"snapshot storage limit reached ({used}/{limit} MiB)")
