"""Per-VM cgroups: the layout read from mountinfo, a fake cgroup v2 tree, and the host's real
controllers (v1 or v2, whichever it has) for what only a real cgroupfs does."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from hatchvm import daemon
from hatchvm.config import Settings
from hatchvm.vmm.cgroups import Layout, Limits, VMCgroups, find_layout
from tests.support.cgroups import cgroup_of, remove_parent
from tests.support.wait import wait_for

HYBRID = """\
25 24 0:22 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
29 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
30 25 0:27 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset
31 25 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
"""


def unified_tree(root: Path, controllers: str) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    return f"30 1 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_layout_v2_when_the_unified_tree_has_both_controllers(tmp_path) -> None:
    mountinfo = unified_tree(tmp_path / "cg", "cpuset cpu io memory pids")
    assert find_layout(mountinfo) == Layout(2, (tmp_path / "cg",))


def test_layout_v1_on_a_hybrid_host_and_none_without_controllers(tmp_path) -> None:
    # The unified tree of a hybrid host usually has no controllers of its own.
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "cgroup.controllers").write_text("hugetlb\n")
    mountinfo = HYBRID.replace("/sys/fs/cgroup/unified", str(tmp_path / "u"))
    layout = find_layout(mountinfo)
    assert layout == Layout(1, (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/cpu,cpuacct")))
    no_memory = "\n".join(line for line in mountinfo.splitlines() if "memory" not in line)
    assert find_layout(no_memory) is None
    assert find_layout("") is None


def test_layout_reads_escaped_mount_points(tmp_path) -> None:
    root = tmp_path / "with space"
    unified_tree(root, "cpu memory")
    line = f"30 1 0:26 / {str(root).replace(' ', chr(92) + '040')} rw - cgroup2 cgroup2 rw\n"
    assert find_layout(line) == Layout(2, (root,))


@pytest.fixture
def fake_v2(tmp_path) -> VMCgroups:
    """A unified tree as the kernel shows it, with the parent's levels already made (a fake
    cannot fill a new directory with the control files cgroupfs would)."""
    root = tmp_path / "cg"
    unified_tree(root, "cpu memory pids")
    (root / "cgroup.subtree_control").write_text("cpu memory\n")  # already on at the root
    for level in (root / "hatchvm", root / "hatchvm" / "test"):
        level.mkdir()
        (level / "cgroup.subtree_control").write_text("")
    cgroups = VMCgroups(Layout(2, (root,)), "hatchvm/test")
    cgroups.prepare()
    return cgroups


def test_v2_prepare_enables_the_controllers_down_to_the_parent(fake_v2) -> None:
    root = fake_v2.layout.roots[0]
    assert (root / "cgroup.subtree_control").read_text() == "cpu memory\n"  # left alone
    for level in (root / "hatchvm", root / "hatchvm" / "test"):
        assert (level / "cgroup.subtree_control").read_text() == "+memory +cpu"


def test_v2_group_limits(fake_v2) -> None:
    fake_v2.create("vm_a", Limits(memory_bytes=400 << 20, vcpus=2))
    group = fake_v2.layout.roots[0] / "hatchvm" / "test" / "vm_a"
    assert (group / "memory.max").read_text() == str(400 << 20)
    assert (group / "cpu.max").read_text() == "200000 100000"  # two CPUs' worth per period
    assert (group / "cpu.weight").read_text() == "200"
    fake_v2.create("vm_big", Limits(memory_bytes=1 << 30, vcpus=200))
    assert (group.parent / "vm_big" / "cpu.weight").read_text() == "10000"  # v2's maximum


def test_v1_group_limits_go_to_each_controllers_hierarchy(tmp_path) -> None:
    memory, cpu = tmp_path / "memory", tmp_path / "cpu,cpuacct"
    for root in (memory, cpu):
        (root / "hatchvm").mkdir(parents=True)
    cgroups = VMCgroups(Layout(1, (memory, cpu)), "hatchvm")
    cgroups.create("vm_a", Limits(memory_bytes=400 << 20, vcpus=2))
    assert sorted(p.name for p in (memory / "hatchvm" / "vm_a").iterdir()) == [
        "memory.limit_in_bytes"
    ]
    assert (memory / "hatchvm" / "vm_a" / "memory.limit_in_bytes").read_text() == str(400 << 20)
    group = cpu / "hatchvm" / "vm_a"
    assert (group / "cpu.cfs_quota_us").read_text() == "200000"
    assert (group / "cpu.cfs_period_us").read_text() == "100000"
    assert (group / "cpu.shares").read_text() == "2048"


def test_launcher_enters_before_the_command_runs(fake_v2) -> None:
    fake_v2.create("vm_a", Limits(memory_bytes=1 << 30, vcpus=1))
    procs = fake_v2.procs_files("vm_a")[0]
    out = subprocess.run(
        [*fake_v2.launcher("vm_a"), "sh", "-c", 'echo "$$ $1"', "x", "--"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid, arg = out.stdout.split()
    assert procs.read_text().strip() == pid  # the same process, written before exec
    assert arg == "--"  # arguments after the launcher's own "--" pass through untouched
    assert fake_v2.pids("vm_a") == {int(pid)}


def test_launcher_fails_when_the_group_is_missing(fake_v2) -> None:
    result = subprocess.run([*fake_v2.launcher("vm_gone"), "true"], capture_output=True)
    assert result.returncode == 125


def test_adopt_moves_only_a_process_outside(fake_v2) -> None:
    limits = Limits(memory_bytes=1 << 30, vcpus=1)
    assert fake_v2.adopt("vm_a", 4242, limits) is True
    assert fake_v2.procs_files("vm_a")[0].read_text() == "4242"
    assert fake_v2.adopt("vm_a", 4242, limits) is False


# ---- the host's real controllers -------------------------------------------------------


@pytest.fixture
def real() -> Iterator[VMCgroups]:
    if os.geteuid() != 0:
        pytest.skip("cgroups need root")
    layout = find_layout(Path("/proc/self/mountinfo").read_text())
    if layout is None:
        pytest.skip("no memory and cpu cgroup controllers on this host")
    cgroups = VMCgroups(layout, f"hatchvm-unit-{os.getpid()}")
    cgroups.prepare()
    yield cgroups
    remove_parent(cgroups)


def test_real_group_holds_a_process_until_removed(real) -> None:
    real.create("vm_a", Limits(memory_bytes=256 << 20, vcpus=1))
    proc = subprocess.Popen([*real.launcher("vm_a"), "sleep", "600"])
    try:
        wait_for(lambda: real.pids("vm_a") == {proc.pid}, 10, "sleep in its group")
        assert all(line.endswith(f"/{real.parent}/vm_a") for line in cgroup_of(proc.pid, real))
        # A group with a process in it is no leftover: the sweep leaves it alone.
        assert real.sweep(keep=set()) == ([], ["vm_a"])
        real.remove("vm_a")  # kills what is left, then removes the group
        assert proc.wait(10) == -9
        assert real.groups() == set()
    finally:
        proc.kill()
        proc.wait()


def test_real_sweep_removes_only_empty_groups_not_kept(real) -> None:
    for name in ("vm_gone", "vm_kept"):
        real.create(name, Limits(memory_bytes=256 << 20, vcpus=1))
    assert real.sweep(keep={"vm_kept"}) == (["vm_gone"], [])
    assert real.groups() == {"vm_kept"}
    real.remove("vm_kept")
    real.remove("vm_kept")  # idempotent


# ---- hatchd's choice at start-up -------------------------------------------------------


def unusable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A layout whose tree cannot hold the parent group (as for a non-root hatchd)."""
    layout = Layout(2, (tmp_path / "not-mounted",))
    monkeypatch.setattr(daemon, "find_layout", lambda _mountinfo: layout)


def test_without_usable_cgroups_hatchd_warns_and_runs(monkeypatch, tmp_path) -> None:
    unusable(monkeypatch, tmp_path)
    with capture_logs() as logs:
        assert daemon._build_cgroups(Settings(cgroups="auto")) is None
    assert [entry["log_level"] for entry in logs] == ["warning"]
    assert "cannot read" in logs[0]["reason"]


def test_required_cgroups_stop_the_daemon(monkeypatch, tmp_path) -> None:
    unusable(monkeypatch, tmp_path)
    with pytest.raises(daemon.StartupError, match="HATCH_CGROUPS=required"):
        daemon._build_cgroups(Settings(cgroups="required"))


def test_cgroups_off(monkeypatch, tmp_path) -> None:
    unusable(monkeypatch, tmp_path)
    with capture_logs() as logs:
        assert daemon._build_cgroups(Settings(cgroups="off")) is None
    assert logs == []
