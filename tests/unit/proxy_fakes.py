"""Stand-ins for core in the proxy's unit tests: one VM, one route, the VM's "guest" being a
server on loopback. `hot` VMs are served on the proxy's synchronous path (known running);
the others go through its full path (a database read, a possible wake) every time."""

from __future__ import annotations

from dataclasses import dataclass

from hatchvm.core.states import State


@dataclass
class FakeVM:
    id: str = "vm_fake"
    user_id: str = "alice"
    state: str = State.RUNNING.value
    guest_ip: str = "127.0.0.1"
    state_reason: str | None = None
    updated_at: str = "boot-1"  # the pool's incarnation key


@dataclass
class FakeRoute:
    target_port: int
    subdomain: str
    vm_id: str = "vm_fake"
    user_id: str = "alice"
    auto_wake: bool = True


class FakeVMs:
    def __init__(self, hot: bool) -> None:
        self.vm = FakeVM()
        self.hot = hot
        self.touched = 0

    async def get(self, user_id: str, vm_id: str) -> FakeVM:
        return self.vm

    def cached(self, vm_id: str) -> FakeVM | None:
        return self.vm if self.hot else None

    async def touch_activity(self, vm_id: str) -> None:
        self.touched += 1


class FakeRoutes:
    def __init__(self, port: int, subdomain: str) -> None:
        self.route = FakeRoute(port, subdomain)

    def lookup(self, subdomain: str) -> FakeRoute | None:
        return self.route if subdomain == self.route.subdomain else None
