"""The HTTP data plane on HATCH_PROXY_ADDR: <subdomain>.<base domain> -> the VM's port.

Every request is routed by its own Host header (an edge proxy may reuse one connection for
many hosts). A sleeping VM is woken through core (one shared wake per VM), then the proxy waits
until the target port accepts connections and forwards. Bodies stream both ways; WebSocket
upgrades are piped message by message. Every error is JSON.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import structlog
from aiohttp import web
from yarl import URL

from hatchvm.config import Settings
from hatchvm.core.activity import Activity
from hatchvm.core.routes import RouteService
from hatchvm.core.states import State
from hatchvm.core.vms import VMService
from hatchvm.core.wake import WakeService, port_open
from hatchvm.db.models import VM, Route
from hatchvm.errors import HatchError, NotFound
from hatchvm.proxy.headers import add_forwarded, end_to_end
from hatchvm.proxy.websocket import pipe_websocket

log = structlog.get_logger("hatchvm.proxy")


class ProxyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Proxy:
    def __init__(
        self,
        settings: Settings,
        vms: VMService,
        routes: RouteService,
        wake: WakeService,
        activity: Activity,
    ) -> None:
        self._s = settings
        self.vms = vms
        self.routes = routes
        self.wake = wake
        self.activity = activity
        self._suffix = "." + settings.proxy_base_domain.lower().strip(".")
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = self._s.proxy_host_port
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        log.info("proxy listening", addr=f"{host}:{port}", domain=self._suffix[1:])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # ---- one request -------------------------------------------------------------------

    def _route_for(self, host: str | None) -> Route:
        name = (host or "").lower().rsplit(":", 1)[0] if host and not host.startswith("[") else ""
        if not name.endswith(self._suffix):
            raise ProxyError(404, f"no route for host {host!r}")
        route = self.routes.lookup(name[: -len(self._suffix)])
        if route is None:
            raise ProxyError(404, f"no route for host {host!r}")
        return route

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            route = self._route_for(request.host)
            vm = await self._awake_vm(route)
        except ProxyError as exc:
            return error(exc.status, exc.message)
        except Exception as exc:  # never a traceback page: JSON, and the reason in the log
            log.exception("proxy request failed", host=request.host)
            return error(500, f"internal error: {type(exc).__name__}: {exc}")
        target = f"http://{vm.guest_ip}:{route.target_port}"
        with self.activity.connection(vm.id):  # a long download or a websocket is use
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await pipe_websocket(request, self._session_or_fail(), target)
            return await self._forward(request, target)

    def _session_or_fail(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("proxy not started")
        return self._session

    async def _awake_vm(self, route: Route) -> VM:
        cached = self.vms.cached(route.vm_id)
        if cached is not None and cached.state == State.RUNNING:
            return cached
        try:
            vm = await self.vms.get(route.user_id, route.vm_id)
        except NotFound:
            raise ProxyError(404, f"route {route.subdomain} has no vm") from None
        if vm.state == State.RUNNING:
            return vm
        if vm.state == State.ERROR:
            raise ProxyError(503, f"vm {vm.id} is in error: {vm.state_reason or 'unknown'}")
        if not route.auto_wake:
            raise ProxyError(503, f"vm {vm.id} is {vm.state} and route does not wake it")
        timeout = self._s.proxy_wake_timeout
        deadline = time.monotonic() + timeout
        try:
            vm = await asyncio.wait_for(self.wake.ensure_running(vm), timeout)
        except TimeoutError:
            raise ProxyError(503, f"vm {vm.id} did not wake within {timeout:g}s") from None
        except HatchError as exc:
            raise ProxyError(503, f"waking vm {vm.id} failed: {exc.message}") from None
        if not await port_open(vm.guest_ip or "", route.target_port, deadline):
            raise ProxyError(503, f"vm {vm.id} woke but port {route.target_port} did not open")
        return vm

    async def _forward(self, request: web.Request, target: str) -> web.StreamResponse:
        headers = end_to_end(request.headers.items(), request.headers.get("Connection"))
        add_forwarded(headers, request.headers, request.remote)
        body = request.content.iter_any() if request.body_exists else None
        try:
            upstream = await self._session_or_fail().request(
                request.method,
                URL(target + request.raw_path, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            )
        except aiohttp.ClientConnectorError as exc:
            return error(502, f"target {target} refused the connection: {exc.os_error}")
        except aiohttp.ClientError as exc:
            return error(502, f"target {target} failed: {exc}")
        async with upstream:
            headers = end_to_end(upstream.headers.items(), upstream.headers.get("Connection"))
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(headers)
            bodiless = upstream.status in (204, 304) or request.method == "HEAD"
            if upstream.headers.get("Content-Length") is None and not bodiless:
                response.enable_chunked_encoding()
            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:
                pass  # the client went away: nobody to answer (aiohttp closes the connection)
            except aiohttp.ClientError as exc:
                log.warning("upstream broke mid-body", target=target, reason=str(exc))
                raise  # the client sees a truncated response, as it must
        return response
