"""How much host memory a QEMU guest may take beyond its RAM: its cgroup's memory limit, and
what host admission counts for each running VM.

Measured here (QEMU 7.2, TCG, microvm, Debian cloud kernel; bench/footprint.py): a booted
guest's QEMU holds about 35 MiB of its own anonymous memory plus the TCG translation cache,
which grows up to tb-size (QEMU's default is 1 GiB; hatchd passes HATCH_QEMU_TB_SIZE_MIB);
reading the kernel, initrd and disks at boot puts 25-40 MiB in page cache charged to the VM;
kernel memory (page tables, page-cache bookkeeping) grows by about 1/40 of the guest's RAM.
Guest RAM itself is the page cache of the VM's memory file, at most mem_mib. So a 256 MiB guest
gets 424 MiB (it peaked at 344 MiB with 128 MiB filled; those parts add up to about 400 with
all its RAM touched) and a 1 GiB guest 1216 MiB (1061 MiB with 800 MiB filled). Going over the
limit reclaims page cache first (guest RAM is written back to its file); only QEMU's own
memory could meet the OOM killer.
"""

from __future__ import annotations

# A QEMU started ahead, waiting for its state (a wake standby, core/standbys.py): measured
# 50 MiB PSS here (TCG), 30 of it its own heap; no guest RAM is touched before the state loads.
STANDBY_MIB = 64
BASE_MIB = 96  # QEMU's own memory + boot-time page cache, with some room for disk caching
RAM_FRACTION = 32  # kernel memory that grows with the guest: mem_mib / RAM_FRACTION


def memory_limit_mib(mem_mib: int, tb_size_mib: int) -> int:
    """Host memory for a guest of mem_mib, its overhead included (tb_size_mib: 0 under KVM)."""
    return mem_mib + mem_mib // RAM_FRACTION + BASE_MIB + tb_size_mib
