"""Header rules of a reverse proxy: hop-by-hop headers stay on their hop (RFC 9110 7.6.1),
X-Forwarded-* tell the guest who asked."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)


def end_to_end(headers: Iterable[tuple[str, str]], connection: str | None) -> CIMultiDict[str]:
    """headers without hop-by-hop ones, including those the Connection header names."""
    named = {t.strip().lower() for t in (connection or "").split(",") if t.strip()}
    drop = HOP_BY_HOP | named
    return CIMultiDict((k, v) for k, v in headers if k.lower() not in drop)


def add_forwarded(
    headers: CIMultiDict[str], original: Mapping[str, str], client_ip: str | None
) -> None:
    """Append the client to X-Forwarded-For; keep an edge proxy's proto, else http."""
    chain = original.get("X-Forwarded-For")
    if client_ip:
        headers["X-Forwarded-For"] = f"{chain}, {client_ip}" if chain else client_ip
    headers["X-Forwarded-Proto"] = original.get("X-Forwarded-Proto", "http")
    headers["X-Forwarded-Host"] = original.get("X-Forwarded-Host") or original.get("Host", "")
