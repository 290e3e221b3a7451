"""The jailer's command line hatchd builds (vmm/fc_jail.py), to the jailer's documented CLI:
`jailer --id --exec-file --uid --gid --chroot-base-dir [--cgroup-version --parent-cgroup
--cgroup FILE=VALUE...] -- <firecracker args>`, the cgroup values those hatchd's own cgroups
would write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hatchvm.vmm.cgroups import Layout, Limits, VMCgroups
from hatchvm.vmm.fc_jail import Jail, Jailer, JailError, UidRange, check_uid_range, jail_id


def _jailer(tmp_path: Path, cgroups: VMCgroups | None) -> tuple[Jailer, Jail]:
    firecracker = tmp_path / "bin" / "firecracker-v1.9"
    firecracker.parent.mkdir()
    firecracker.write_text("")
    jailer = Jailer("/usr/bin/jailer", str(firecracker), tmp_path / "jails", UidRange(4000, 8))
    jailer.cgroups = cgroups
    jail = jailer.jail("vm_ab12")
    jail.root.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(jail.root, 4003, 4003)  # the uid the jail was given
    return jailer, jail


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (2, ["memory.max=805306368", "cpu.max=200000 100000", "cpu.weight=200"]),
        (
            1,
            [
                "memory.limit_in_bytes=805306368",
                "cpu.cfs_period_us=100000",
                "cpu.cfs_quota_us=200000",
                "cpu.shares=2048",
            ],
        ),
    ],
)
def test_the_command_line_is_the_jailers_with_the_vms_cgroup_limits(
    tmp_path: Path, version: int, expected: list[str]
) -> None:
    roots = (Path("/sys/fs/cgroup"),) if version == 2 else (Path("/m"), Path("/c"))
    jailer, jail = _jailer(tmp_path, VMCgroups(Layout(version, roots), "hatchvm"))
    uid = str(jail.owner())
    cmd = jailer.command(jail, Limits(768 << 20, 2), ["--api-sock", "/run/api.sock"])
    options = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--cgroup"]
    assert cmd[: cmd.index("--cgroup-version")] == [
        "/usr/bin/jailer",
        *("--id", "vm-ab12", "--exec-file", str(tmp_path / "bin" / "firecracker-v1.9")),
        *("--uid", uid, "--gid", uid, "--chroot-base-dir", str(tmp_path / "jails")),
    ]
    assert cmd[cmd.index("--cgroup-version") + 1] == str(version)
    assert cmd[cmd.index("--parent-cgroup") + 1] == "hatchvm"
    assert options == expected
    assert cmd[cmd.index("--") :] == ["--", "--api-sock", "/run/api.sock"]
    # The jail is where the jailer builds it: <base>/<exec file name>/<id>/root.
    assert jail.root == tmp_path / "jails" / "firecracker-v1.9" / "vm-ab12" / "root"


def test_without_cgroups_no_cgroup_option_is_given(tmp_path: Path) -> None:
    jailer, jail = _jailer(tmp_path, None)
    cmd = jailer.command(jail, None, ["--api-sock", "/run/api.sock"])
    assert not {"--cgroup", "--cgroup-version", "--parent-cgroup"} & set(cmd)


def test_jail_ids_are_what_the_jailer_accepts() -> None:
    assert jail_id("vm_k3j9x0a1b2c3") == "vm-k3j9x0a1b2c3"


def test_a_uid_range_holding_an_account_is_refused() -> None:
    with pytest.raises(JailError, match=r"uid 0 .* belongs to user 'root'"):
        check_uid_range(UidRange(0, 1))
    check_uid_range(UidRange(910_500, 100))  # the control: nobody has these
