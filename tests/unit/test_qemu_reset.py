"""A panicked guest under QEMU resets by triple fault, which -no-reboot turns into an exit."""

from __future__ import annotations

from hatchvm.vmm.qemu import reset_by_triple_fault


def test_the_images_keyboard_reset_becomes_a_triple_fault() -> None:
    args = "console=ttyS0 reboot=k panic=1 quiet"
    assert reset_by_triple_fault(args) == f"{args} reboot=t"


def test_a_reset_the_vm_chose_is_kept() -> None:
    for args in ("console=ttyS0 reboot=k panic=1 reboot=a", "panic=1 reboot=t", "panic=1"):
        assert reset_by_triple_fault(args) == args
    # The last reboot= is the one the kernel keeps: a user's later reboot=k is rewritten too.
    assert reset_by_triple_fault("reboot=a reboot=k").endswith(" reboot=t")
