"""WebSocket upgrades through the proxy: one connection to the guest, messages piped both ways
until either side closes."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL

from hatchvm.proxy.headers import add_forwarded, end_to_end

Socket = aiohttp.ClientWebSocketResponse | web.WebSocketResponse

# Set by the WebSocket handshake itself on each side.
_HANDSHAKE = {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"}


async def pipe_websocket(
    request: web.Request, session: aiohttp.ClientSession, target: str
) -> web.StreamResponse:
    headers = end_to_end(request.headers.items(), request.headers.get("Connection"))
    for name in list(headers):
        if name.lower() in _HANDSHAKE or name.lower() == "sec-websocket-protocol":
            headers.popall(name, None)
    add_forwarded(headers, request.headers, request.remote)
    protocols = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    url = URL(target.replace("http://", "ws://", 1) + request.raw_path, encoded=True)
    try:
        upstream = await session.ws_connect(
            url, headers=headers, protocols=protocols, autoping=False, max_msg_size=0
        )
    except (aiohttp.ClientError, aiohttp.WSServerHandshakeError) as exc:
        return web.json_response(
            {"error": f"target {target} refused the websocket: {exc}"}, status=502
        )
    downstream = web.WebSocketResponse(
        protocols=[upstream.protocol] if upstream.protocol else (), autoping=False, max_msg_size=0
    )
    await downstream.prepare(request)

    async def pump(src: Socket, dst: Socket) -> None:
        async for msg in src:
            if msg.type == WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == WSMsgType.PING:
                await dst.ping(msg.data)
            elif msg.type == WSMsgType.PONG:
                await dst.pong(msg.data)
            else:
                break
        await dst.close(code=src.close_code or aiohttp.WSCloseCode.OK)

    async with upstream:
        tasks = [
            asyncio.create_task(pump(downstream, upstream)),
            asyncio.create_task(pump(upstream, downstream)),
        ]
        _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return downstream
