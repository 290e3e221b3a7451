"""The benchmarks' stopwatch end: the moment a URL first answers 200."""

from __future__ import annotations

import os
import time

import httpx


def first_answer(
    url: str,
    timeout: float = 120,
    poll: float = 0.01,
    headers: dict[str, str] | None = None,
    request_timeout: float = 0.5,
) -> float:
    """Poll url every `poll` seconds until it answers 200; return the moment it did.
    A request that is itself slow (a proxy waking a VM) needs a long request_timeout."""
    deadline = time.monotonic() + timeout
    # One client for all polls: a new one per poll costs milliseconds of set-up each time.
    with httpx.Client(headers=headers, timeout=request_timeout) as client:
        while time.monotonic() < deadline:
            try:
                if client.get(url).status_code == 200:
                    return time.monotonic()
            except httpx.TransportError:
                pass
            time.sleep(poll)
    raise TimeoutError(url)


def stored(api: httpx.Client, snapshot: dict, timeout: float = 900) -> dict:
    """The snapshot once its background store has ended; raises unless it was stored."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = api.get(f"/snapshots/{snapshot['id']}").raise_for_status().json()
        if snap["status"] == "stored":
            return dict(snap)
        if snap["status"] == "failed":
            raise RuntimeError(f"snapshot {snap['id']} failed: {snap['status_reason']}")
        time.sleep(0.05)
    raise TimeoutError(f"snapshot {snapshot['id']} still storing after {timeout}s")


def standby_ready(api: httpx.Client, timeout: float = 60) -> None:
    """Until hatchd reports a wake standby (core/standbys.py) waiting, if it keeps any: one
    starts right after a snapshot is stored, and a restore timed before it is ready would be
    neither kind of hot restore (nor should its start weigh on a baseline timed meanwhile).
    HATCH_WAKE_STANDBYS=0 in the environment (which the benches' hatchd inherits): none."""
    if os.environ.get("HATCH_WAKE_STANDBYS") == "0":  # hatchd keeps none
        return
    deadline = time.monotonic() + timeout
    while True:
        text = api.get("/metrics").raise_for_status().text
        line = next(li for li in text.splitlines() if li.startswith("hatch_wake_standbys "))
        if float(line.split()[1]) >= 1:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("no wake standby started")
        time.sleep(0.01)
