"""The HTTP data plane on HATCH_PROXY_ADDR: <subdomain>.<base domain> -> the VM's port.

A protocol-level proxy on the event loop: httptools parses both sides, bytes are written
straight from one transport to the other with back-pressure, and guest connections are kept
alive in a pool. Finding the VM is synchronous on the hot path (routes and running VMs are in
memory); a sleeping VM is woken through core (one shared wake per VM), then the proxy waits
until the target port accepts connections and forwards. Every error is JSON.

Clients and guests are both untrusted: connections are capped in total and per address
(limits.py), every head is capped in size, and every phase of a connection has a timeout
(phases.py) that one sweeper enforces.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog

from hatchvm.clients import IPAddress, address_key, parse_address
from hatchvm.config import Settings
from hatchvm.core.activity import Activity
from hatchvm.core.routes import RouteService
from hatchvm.core.states import State
from hatchvm.core.vms import VMService
from hatchvm.core.wake import WakeService, first_connection
from hatchvm.db.models import VM, Route
from hatchvm.errors import HatchError, NotFound
from hatchvm.logsummary import RepeatLog
from hatchvm.metrics import Metrics
from hatchvm.metrics.figures import How
from hatchvm.proxy.client import ClientConnection
from hatchvm.proxy.exchange import Exchange
from hatchvm.proxy.headers import Headers, forwarded_for
from hatchvm.proxy.limits import Admission, capped_by_fd_budget
from hatchvm.proxy.phases import CONNECTING, Phase, Timeouts
from hatchvm.proxy.upstream import PoolKey, Upstream, UpstreamPool

log = structlog.get_logger("hatchvm.proxy")


class ProxyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Waited:
    """A request that waited for its VM to wake: how it woke, when the wait began and ended."""

    how: How | None  # None: another caller's wake had just ended
    began: float
    woke: float


class Proxy:
    def __init__(
        self,
        settings: Settings,
        vms: VMService,
        routes: RouteService,
        wake: WakeService,
        activity: Activity,
        metrics: Metrics | None = None,
    ) -> None:
        self._s = settings
        self.vms = vms
        self.routes = routes
        self.wake = wake
        self.activity = activity
        self.metrics = metrics or Metrics()
        self.requests = self.metrics.requests  # every exchange's end is counted here
        self.max_head = settings.proxy_max_head_bytes
        self.timeouts = Timeouts.from_settings(settings)
        self.admission = Admission(
            settings.proxy_max_connections, settings.proxy_max_connections_per_address
        )
        self._trusted = settings.proxy_trusted_networks
        self.pool = UpstreamPool(self.max_head)
        self.connections: set[ClientConnection] = set()
        self.refused_lingering = 0  # refused connections still reading their refusal
        self._suffix = "." + settings.proxy_base_domain.lower().strip(".")
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._refusals = RepeatLog(log, "proxy refused connections", interval=60.0)
        self._timeouts = RepeatLog(log, "proxy timed out connections", interval=60.0)

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self.admission.total = capped_by_fd_budget(self.admission.total, "proxy")
        host, port = self._s.proxy_host_port
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), host or None, port, reuse_address=True, backlog=2048
        )
        self._sweeper = asyncio.create_task(self._sweep(), name="proxy-sweeper")
        log.info("proxy listening", addr=f"{host}:{port}", domain=self._suffix[1:])

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.abort()
        self.pool.close_all()

    async def _sweep(self) -> None:
        """The one place timeouts are enforced: every connection's clock, every tick."""
        while True:
            await asyncio.sleep(self.timeouts.tick)
            now = time.monotonic()
            for connection in list(self.connections):
                connection.expire(now)
            self.pool.expire(now)

    # ---- who the clients are ----------------------------------------------------------

    def trusts(self, address: IPAddress) -> bool:
        return any(address in net for net in self._trusted)

    def forwarded_key(self, headers: Headers) -> str | None:
        """The client a trusted proxy forwards for: the nearest X-Forwarded-For entry that
        is not one of the trusted proxies themselves."""
        for text in reversed(forwarded_for(headers)):
            address = parse_address(text)
            if address is None:
                return None
            if not self.trusts(address):
                return address_key(address)
        return None

    def refused(self, status: int, source: str) -> None:
        self.metrics.proxy_refused(status)
        self._refusals.note(str(status), source=source)

    def timed_out(self, phase: Phase, source: str) -> None:
        self.metrics.proxy_timed_out(phase.value)
        self._timeouts.note(phase.value, source=source)

    # ---- one request -------------------------------------------------------------------

    def begin(self, exchange: Exchange) -> None:
        """Serve exchange: at once when its VM runs and a kept-alive connection waits,
        otherwise in a task that wakes the VM and connects."""
        exchange.phase = CONNECTING  # its own timeouts below: no clock to restart
        try:
            route = self._route_for(exchange.host)
        except ProxyError as exc:
            exchange.fail(exc.status, exc.message)
            return
        vm = self.vms.cached(route.vm_id)
        if vm is not None and vm.state == State.RUNNING:
            key = pool_key(vm, route)
            upstream = self.pool.take(key)
            if upstream is not None:
                exchange.attach(upstream, key, vm.id)
                return
        exchange.task = asyncio.create_task(self._prepare(exchange, route))

    def reconnect(self, exchange: Exchange) -> None:
        exchange.task = asyncio.create_task(self._reconnect(exchange))

    def _route_for(self, host: bytes) -> Route:
        text = host.decode("latin-1").strip().lower()
        name = text.rsplit(":", 1)[0] if not text.startswith("[") else ""
        if name.endswith(self._suffix):
            route = self.routes.lookup(name[: -len(self._suffix)])
            if route is not None:
                return route
        raise ProxyError(404, f"no route for host {text!r}")

    async def _prepare(self, exchange: Exchange, route: Route) -> None:
        try:
            vm, waited = await self._awake_vm(route)
            key = pool_key(vm, route)
            if waited is None:
                upstream = self.pool.take(key) or await self._connect(key)
            else:
                upstream = await self._connect_after_wake(key, waited)
            connected = time.monotonic()
        except ProxyError as exc:
            exchange.fail(exc.status, exc.message)
            return
        except Exception as exc:  # never a traceback page: JSON, and the reason in the log
            log.exception("proxy request failed", host=exchange.host.decode("latin-1"))
            exchange.fail(500, f"internal error: {type(exc).__name__}: {exc}")
            return
        exchange.task = None
        exchange.attach(upstream, key, vm.id)
        if waited is not None:
            self._woken_request(exchange, waited, connected, vm.id)

    def _woken_request(
        self, exchange: Exchange, waited: Waited, connected: float, vm_id: str
    ) -> None:
        """A request that woke its VM is now with the guest: its stages, logged and measured
        (the wake itself is measured once per wake, by WakeService)."""
        now = time.monotonic()
        port_wait = connected - waited.woke
        own = (waited.began - exchange.began) + (now - connected)  # the proxy's own time
        log.info(
            "request woke vm",
            vm_id=vm_id,
            how=waited.how,
            wake_ms=round((waited.woke - waited.began) * 1000, 1),
            port_wait_ms=round(port_wait * 1000, 1),
            proxy_ms=round(own * 1000, 2),
        )
        if waited.how is not None:
            self.metrics.wake_stage("port_wait", waited.how, "proxy", port_wait)
            self.metrics.wake_stage("proxy", waited.how, "proxy", own)

    async def _reconnect(self, exchange: Exchange) -> None:
        key, vm_id = exchange.key, exchange.vm_id
        if key is None or vm_id is None:
            return
        try:
            upstream = await self._connect(key)
        except ProxyError as exc:
            exchange.fail(exc.status, exc.message)
            return
        exchange.task = None
        exchange.attach(upstream, key, vm_id)

    async def _connect(self, key: PoolKey) -> Upstream:
        target = f"{key[2]}:{key[3]}"
        try:
            return await self.pool.connect(key, self.pool.connect_timeout)
        except TimeoutError:
            raise ProxyError(502, f"target {target} did not accept the connection") from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ProxyError(502, f"target {target} refused the connection: {reason}") from None

    async def _connect_after_wake(self, key: PoolKey, waited: Waited) -> Upstream:
        """The first connection the woken guest accepts is the one the request uses."""
        deadline = waited.began + self._s.proxy_wake_timeout
        upstream = await first_connection(lambda: self.pool.connect(key, timeout=None), deadline)
        if upstream is None:
            raise ProxyError(503, f"vm {key[0]} woke but port {key[3]} did not open")
        return upstream

    async def _awake_vm(self, route: Route) -> tuple[VM, Waited | None]:
        """The route's VM, running: woken when it slept (then also how, and when the wait
        began and ended, for the connection that follows)."""
        cached = self.vms.cached(route.vm_id)
        if cached is not None and cached.state == State.RUNNING:
            return cached, None
        try:
            vm = await self.vms.get(route.user_id, route.vm_id)
        except NotFound:
            raise ProxyError(404, f"route {route.subdomain} has no vm") from None
        if vm.state == State.RUNNING:
            return vm, None
        if vm.state == State.ERROR:
            raise ProxyError(503, f"vm {vm.id} is in error: {vm.state_reason or 'unknown'}")
        if not route.auto_wake:
            raise ProxyError(503, f"vm {vm.id} is {vm.state} and route does not wake it")
        timeout = self._s.proxy_wake_timeout
        began = time.monotonic()
        try:
            woken = await asyncio.wait_for(self.wake.wake_up(vm, "proxy"), timeout)
        except TimeoutError:
            raise ProxyError(503, f"vm {vm.id} did not wake within {timeout:g}s") from None
        except HatchError as exc:  # the message names the vm and when it is tried again
            raise ProxyError(503, exc.message) from None
        return woken.vm, Waited(woken.how, began, time.monotonic())


def pool_key(vm: VM, route: Route) -> PoolKey:
    """Connections are per VM incarnation: every state change rewrites updated_at."""
    return (vm.id, vm.updated_at, vm.guest_ip or "", route.target_port)
