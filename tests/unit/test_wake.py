"""Waking with back-off (core/wake.py), against stand-ins for VMService and SnapshotService and
a clock the test moves: a failed wake is not retried by the next request, the waits double,
and after HATCH_WAKE_MAX_FAILURES failures in a row the VM goes to error through
VMService.update."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from hatchvm.core import wake as wake_module
from hatchvm.core.locks import KeyedLocks
from hatchvm.core.states import State
from hatchvm.core.wake import WakeService
from hatchvm.errors import HatchError, InternalError


@dataclass
class StubVM:
    id: str = "vm_sleepy"
    user_id: str = "alice"
    state: str = State.SNAPSHOTTED.value
    state_reason: str | None = None


class StubVMs:
    def __init__(self) -> None:
        self.vm = StubVM()
        self.locks = KeyedLocks()
        self.delete_hooks: list[Any] = []
        self.updates: list[dict[str, Any]] = []

    async def get(self, user_id: str, vm_id: str) -> StubVM:
        return self.vm

    @asynccontextmanager
    async def sessions(self) -> AsyncIterator[None]:
        yield None

    async def update(self, vm_id: str, **fields: Any) -> StubVM:
        assert self.locks.busy(vm_id), "state changes hold the VM's lock"
        self.updates.append(fields)
        for name, value in fields.items():
            setattr(self.vm, name, value.value if isinstance(value, State) else value)
        return self.vm


class StubSnapshots:
    """Restores fail while `broken`, like a snapshot whose artifacts are gone."""

    def __init__(self, vms: StubVMs) -> None:
        self.vms = vms
        self.restores = 0
        self.broken = True

    async def restore_locked(self, vm: StubVM, snap: object) -> StubVM:
        self.restores += 1
        await asyncio.sleep(0.01)  # long enough for concurrent waiters to pile up
        if self.broken:
            raise InternalError("snapshot snap_1 cannot be restored: artifact mem.zst is missing")
        vm.state = State.RUNNING.value
        return vm


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> tuple[WakeService, StubVMs, StubSnapshots, Clock]:
    async def one_snapshot(_session: object, _vm_id: str) -> list[object]:
        return [type("Snap", (), {"id": "snap_1", "status": "stored"})()]

    monkeypatch.setattr(wake_module.repo, "list_snapshots", one_snapshot)
    vms = StubVMs()
    snapshots = StubSnapshots(vms)
    clock = Clock()
    service = WakeService(vms, snapshots, max_failures=3, backoff=5.0, clock=clock)  # type: ignore[arg-type]
    return service, vms, snapshots, clock


async def refusal(service: WakeService, vms: StubVMs) -> str:
    with pytest.raises(HatchError) as err:  # WakeFailed
        await service.ensure_running(vms.vm)  # type: ignore[arg-type]
    assert err.value.status == 503
    return err.value.message


async def test_failed_wake_backs_off_then_the_vm_goes_to_error(setup) -> None:
    service, vms, snapshots, clock = setup
    waiters = [service.ensure_running(vms.vm) for _ in range(5)]
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert snapshots.restores == 1  # five requests, one attempt
    assert all(isinstance(r, HatchError) and r.status == 503 for r in results)
    assert "artifact mem.zst is missing; next attempt in 5s" in str(results[0])

    for _ in range(10):  # requests while backing off: refused at once, nothing redone
        message = await refusal(service, vms)
    assert snapshots.restores == 1
    assert message == (
        "waking vm vm_sleepy failed once (last: snapshot snap_1 cannot be restored: "
        "artifact mem.zst is missing); next attempt in 5s"
    )
    clock.now += 4.0
    assert "next attempt in 1s" in await refusal(service, vms)

    clock.now += 1.5  # the wait is over: one more attempt, then twice as long
    assert "next attempt in 10s" in await refusal(service, vms)
    assert snapshots.restores == 2
    clock.now += 5.0
    assert "failed 2 times in a row" in await refusal(service, vms)
    assert snapshots.restores == 2

    clock.now += 5.5  # the third failure in a row: error, with the reason
    message = await refusal(service, vms)
    assert snapshots.restores == 3
    assert vms.vm.state == State.ERROR.value
    reason = vms.vm.state_reason
    assert reason is not None and reason.startswith("waking failed 3 times in a row, last: ")
    assert "artifact mem.zst is missing" in reason
    assert message == f"waking vm vm_sleepy failed; vm is in error: {reason}"
    assert vms.updates == [{"state": State.ERROR, "state_reason": reason}]

    clock.now += 3600  # in error, the VM is not tried again, however long one waits
    assert await refusal(service, vms) == f"vm vm_sleepy is in error: {reason}"
    assert snapshots.restores == 3


async def test_a_wake_that_succeeds_starts_the_count_afresh(setup) -> None:
    service, vms, snapshots, clock = setup
    await refusal(service, vms)
    clock.now += 5.1
    snapshots.broken = False
    assert (await service.ensure_running(vms.vm)).state == State.RUNNING.value  # type: ignore[arg-type]
    vms.vm.state = State.SNAPSHOTTED.value  # asleep again, and the store breaks again
    snapshots.broken = True
    assert "next attempt in 5s" in await refusal(service, vms)  # the first failure again
    clock.now += 5.1
    assert "next attempt in 10s" in await refusal(service, vms)
    assert vms.vm.state == State.SNAPSHOTTED.value
