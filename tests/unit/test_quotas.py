"""Per-user quotas: each limit is refused with a 403 that names it, at the first step past it."""

from __future__ import annotations

import pytest

from hatchvm.config import Settings
from hatchvm.core.quotas import Usage, check_create, check_snapshot
from hatchvm.errors import QuotaExceeded

SETTINGS = Settings(
    max_vms_per_user=5,
    max_vcpus_per_user=8,
    max_mem_mib_per_user=4096,
    vm_disk_mib=1024,
    max_disk_mib_per_user=3072,
    max_snapshot_mib_per_user=100,
)


def refusal(usage: Usage, vcpus: int = 1, mem: int = 256) -> str | None:
    try:
        check_create(SETTINGS, usage, vcpus, mem)
    except QuotaExceeded as exc:
        assert exc.status == 403
        return exc.message
    return None


def test_the_defaults_fit_five_default_vms() -> None:
    defaults = Settings()
    usage = Usage(vms=4, vcpus=4 * defaults.default_vcpu, mem_mib=4 * defaults.default_mem_mib)
    check_create(defaults, usage, defaults.default_vcpu, defaults.default_mem_mib)


def test_each_total_is_named_at_its_limit() -> None:
    assert refusal(Usage(vms=1, vcpus=7, mem_mib=256), vcpus=1) is None
    assert refusal(Usage(vms=1, vcpus=7, mem_mib=256), vcpus=2) == "vcpu limit reached: 7 + 2 > 8"
    assert refusal(Usage(vms=1, vcpus=1, mem_mib=3072), mem=1024) is None
    assert (
        refusal(Usage(vms=1, vcpus=1, mem_mib=3072), mem=1025)
        == "memory limit reached: 3072 + 1025 MiB > 4096 MiB"
    )
    assert refusal(Usage(vms=2, vcpus=2, mem_mib=512)) is None
    assert (
        refusal(Usage(vms=3, vcpus=3, mem_mib=768))
        == "disk limit reached: 3072 + 1024 MiB > 3072 MiB"
    )


def test_the_vm_count_comes_first_with_its_old_message() -> None:
    assert refusal(Usage(vms=5, vcpus=8, mem_mib=4096)) == "vm limit reached (5/5)"


@pytest.mark.parametrize(
    ("used", "message"),
    [
        (0, None),
        ((100 << 20) - 1, None),
        (100 << 20, "snapshot storage limit reached (100/100 MiB)"),
        ((100 << 20) + 1, "snapshot storage limit reached (101/100 MiB)"),
    ],
)
def test_snapshot_storage(used: int, message: str | None) -> None:
    if message is None:
        check_snapshot(SETTINGS, used)
    else:
        with pytest.raises(QuotaExceeded) as err:
            check_snapshot(SETTINGS, used)
        assert err.value.message == message
