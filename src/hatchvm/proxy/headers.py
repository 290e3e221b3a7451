"""HTTP/1.1 heads as the proxy writes them: hop-by-hop headers stay on their hop (RFC 9110
7.6.1), X-Forwarded-* tell the guest who asked, and the framing of each hop is the proxy's own.
Headers are (name, value) byte pairs exactly as httptools hands them over.

A client's own X-Forwarded-* (and Forwarded) are claims about itself: they are replaced,
unless the client is a trusted proxy (HATCH_PROXY_TRUSTED_PROXIES), whose chain is extended."""

from __future__ import annotations

import json
from http import HTTPStatus

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
FORWARDING = (b"x-forwarded-", b"forwarded")  # name prefixes of the forwarding headers
LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def connection_tokens(value: bytes) -> frozenset[bytes]:
    common = COMMON_CONNECTION.get(value)  # nearly every message: no parse
    if common is not None:
        return common
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


COMMON_CONNECTION = {
    spelling: frozenset({spelling.lower()})
    for spelling in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}


def request_head(
    method: bytes,
    target: bytes,
    headers: Headers,
    dropped: frozenset[bytes],
    client_ip: bytes,
    *,
    trusted: bool,
    chunked: bool,
    upgrade: bytes | None,
) -> bytes:
    """The request as the guest receives it: end-to-end headers, our own framing, and
    X-Forwarded-For/-Proto/-Host: the client's address, http, its Host; from a trusted proxy,
    its chain with its address appended and its proto and host kept."""
    out = [method, b" ", target, b" HTTP/1.1\r\n"]
    chain: list[bytes] = []
    proto = b"http"
    host = forwarded_host = b""
    for name, value in headers:
        low = name.lower()
        if low in dropped:
            continue
        if low.startswith(FORWARDING):
            if not trusted:
                continue
            if low == b"x-forwarded-for":
                chain.append(value)
                continue
            if low == b"x-forwarded-proto":
                proto = value
                continue
            if low == b"x-forwarded-host":
                forwarded_host = value
                continue
        elif low == b"host":
            host = value
        elif chunked and low == b"content-length":
            continue  # chunked wins over a length (RFC 9112 6.3)
        out += (name, b": ", value, b"\r\n")
    chain.append(client_ip)
    out += (b"X-Forwarded-For: ", b", ".join(chain), b"\r\n")
    out += (b"X-Forwarded-Proto: ", proto, b"\r\nX-Forwarded-Host: ", forwarded_host or host)
    out.append(b"\r\n")
    if chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade is not None:
        out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def head_size(headers: Headers) -> int:
    """Bytes of header names and values: what a head limit counts."""
    return sum(len(name) + len(value) for name, value in headers)


def forwarded_for(headers: Headers) -> list[str]:
    """Every X-Forwarded-For entry, nearest last."""
    entries: list[str] = []
    for name, value in headers:
        if name.lower() == b"x-forwarded-for":
            entries += (e.strip() for e in value.decode("latin-1").split(","))
    return entries


def response_head(status: int, reason: bytes, headers: Headers, extra: bytes) -> bytes:
    """Status line, the given (already filtered) headers, then extra (framing lines)."""
    out = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
    for name, value in headers:
        out += (name, b": ", value, b"\r\n")
    out += (extra, b"\r\n")
    return b"".join(out)


def end_to_end(headers: Headers) -> tuple[Headers, bool, bool]:
    """(headers without hop-by-hop ones, had Transfer-Encoding, had Content-Length). One pass
    over a guest's headers on every response: each name is lowered once."""
    kept: Headers = []
    named: frozenset[bytes] = frozenset()
    chunked = sized = False
    for name, value in headers:
        low = name.lower()
        if low in HOP_BY_HOP:
            if low == b"connection":
                named |= connection_tokens(value)
            elif low == b"transfer-encoding":
                chunked = True
            continue
        if low == b"content-length":
            sized = True
        kept.append((name, value))
    named -= HOP_BY_HOP  # usually nothing is left: "Connection: keep-alive" or "close"
    if named or (chunked and sized):  # a length next to chunked is not to be trusted (6.3)
        if chunked and sized:
            named |= {b"content-length"}
        kept = [(n, v) for n, v in kept if n.lower() not in named]
    return kept, chunked, sized


def error_response(status: int, message: str, *, close: bool) -> bytes:
    body = json.dumps({"error": message}).encode()
    extra = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    if close:
        extra += b"Connection: close\r\n"
    return response_head(status, HTTPStatus(status).phrase.encode(), [], extra) + body
