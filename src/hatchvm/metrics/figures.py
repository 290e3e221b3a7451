"""Every figure hatchd exposes (name, type, labels) and one method per event that moves it.

Label values come from small fixed sets (the Literal types below, the VM states, the proxy's
phases), never from a VM, a user or a request, so the series stay bounded. Series of the known
label sets start at 0, so a rate() has a baseline before the first event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from hatchvm.core.states import State
from hatchvm.metrics.requests import RequestStats

How = Literal["restore", "cold_boot"]  # how a sleeping VM was woken
Creation = Literal["template", "cold_boot"]  # how a new VM came to run
Trigger = Literal["proxy", "ssh", "api"]  # what woke it
Stage = Literal["wake", "port_wait", "proxy"]
Step = Literal["capture", "store", "restore"]

# Which stages each trigger measures: the API's callers wait for the VM only; the SSH gateway
# also for the guest's port 22; the proxy also accounts for its own time around them.
STAGES: dict[Trigger, tuple[Stage, ...]] = {
    "proxy": ("wake", "port_wait", "proxy"),
    "ssh": ("wake", "port_wait"),
    "api": ("wake",),
}
# Why a VMM process ended, as ExitInfo.reason says (QEMU's SHUTDOWN reasons and ours); any
# other reason is "other" and a process that ended without a word is "unknown".
DEATH_REASONS = ("guest-shutdown", "guest-reset", "guest-panic", "host-signal", "other", "unknown")
SshRefusal = Literal[
    "address_not_allowed", "no_identification", "wake_rate_limited", "wake_failed", "port_closed"
]
SSH_REFUSALS: tuple[SshRefusal, ...] = get_args(SshRefusal)
REFUSAL_STATUSES = (429, 503)  # the proxy's admission: per address, in total

# Seconds. A woken request's own proxy time is sub-millisecond, a hot restore tens of
# milliseconds, a cold boot or a store of a large memory file seconds to minutes (TCG guests).
WAKE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip
SNAPSHOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0
)  # fmt: skip
REQUEST_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip


def _flag(value: bool) -> str:
    return "true" if value else "false"


class Metrics:
    """hatchd's figures in their own registry (nothing global: tests build as many as they
    like). Built once in daemon.py and handed to every part that records."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._wake = Histogram(
            "hatch_wake_duration_seconds",
            "Waking a sleeping VM, by stage: wake (restoring or cold-booting it, from the first "
            "waiter's call), port_wait (after that, until the guest's port accepted), proxy "
            "(a woken request's time in the proxy beyond those two); by how it woke and what "
            "woke it",
            ["stage", "how", "trigger"],
            buckets=WAKE_BUCKETS,
            registry=r,
        )
        self._wake_failures = Counter(
            "hatch_wake_failures",
            "Wakes that failed (the VM backs off, or goes to error), by what asked for them",
            ["trigger"],
            registry=r,
        )
        self._capture = Histogram(
            "hatch_snapshot_capture_duration_seconds",
            "Capturing a snapshot: pausing the guest and saving its device state",
            ["automatic"],
            buckets=SNAPSHOT_BUCKETS,
            registry=r,
        )
        self._store = Histogram(
            "hatch_snapshot_store_duration_seconds",
            "Storing a captured snapshot in the background (compressing and writing its chunks, "
            "recording it stored)",
            ["automatic"],
            buckets=SNAPSHOT_BUCKETS,
            registry=r,
        )
        self._stored_bytes = Counter(
            "hatch_snapshot_stored_bytes",
            "Bytes snapshots added to the snapshot store",
            ["automatic"],
            registry=r,
        )
        self._deduplicated = Counter(
            "hatch_snapshot_bytes_deduplicated",
            "Bytes saved by shared chunks: uncompressed bytes of snapshot pages not stored "
            "again because the user's chunk store already held them (from earlier snapshots "
            "of the user's VMs, or earlier in the same snapshot); all-zero pages are never "
            "stored and not counted",
            registry=r,
        )
        self._restore = Histogram(
            "hatch_restore_duration_seconds",
            "Restoring a VM from a snapshot until its guest runs: hot (its own files still "
            "equal the snapshot) or store (fetched and unpacked first)",
            ["source"],
            buckets=SNAPSHOT_BUCKETS,
            registry=r,
        )
        self._standbys = Gauge(
            "hatch_wake_standbys",
            "Sleeping VMs whose VMM is started ahead, waiting for their state, so that a wake "
            "only loads it (at most HATCH_WAKE_STANDBYS)",
            registry=r,
        )
        self._snapshot_failures = Counter(
            "hatch_snapshot_failures",
            "Snapshot captures, stores and restores that failed",
            ["step"],
            registry=r,
        )
        self._create = Histogram(
            "hatch_create_duration_seconds",
            "Creating a VM until its guest runs, by how: from a warm template of its shape, or "
            "a cold boot",
            ["how"],
            buckets=WAKE_BUCKETS,
            registry=r,
        )
        self._vms = Gauge(
            "hatch_vms",
            "VMs by lifecycle state, counted in the database at scrape time",
            ["state"],
            registry=r,
        )
        self.requests = RequestStats(REQUEST_BUCKETS)
        r.register(self.requests)
        self._proxy_refusals = Counter(
            "hatch_proxy_refusals",
            "Connections (or, behind a trusted proxy, requests) the proxy refused at "
            "admission: 429 too many from one address, 503 too many in total",
            ["status"],
            registry=r,
        )
        self._proxy_timeouts = Counter(
            "hatch_proxy_timeouts",
            "Proxy connections cut off by a timeout, by the phase they stalled in",
            ["phase"],
            registry=r,
        )
        self._agent_syncs = Counter(
            "hatch_agent_syncs",
            "Guest clock and RNG resyncs after a restore, by result (ok, failed)",
            ["result"],
            registry=r,
        )
        self._deaths = Counter(
            "hatch_vm_deaths",
            "VMM processes that ended without hatchd ending them, by reason",
            ["reason"],
            registry=r,
        )
        self._ssh_connections = Counter(
            "hatch_ssh_connections", "Connections accepted by the SSH gateway", registry=r
        )
        self._ssh_refusals = Counter(
            "hatch_ssh_refusals",
            "SSH gateway connections closed without reaching the guest, by reason",
            ["reason"],
            registry=r,
        )
        ProcessCollector(registry=r)  # hatchd's own CPU, memory and descriptors
        self._start_at_zero()

    def _start_at_zero(self) -> None:
        for trigger, stages in STAGES.items():
            self._wake_failures.labels(trigger)
            for stage in stages:
                for how in ("restore", "cold_boot"):
                    self._wake.labels(stage, how, trigger)
        for automatic in ("true", "false"):
            self._capture.labels(automatic)
            self._store.labels(automatic)
            self._stored_bytes.labels(automatic)
        for creation in get_args(Creation):
            self._create.labels(creation)
        for source in ("hot", "store"):
            self._restore.labels(source)
        for step in ("capture", "store", "restore"):
            self._snapshot_failures.labels(step)
        for status in REFUSAL_STATUSES:
            self._proxy_refusals.labels(str(status))
        for result in ("ok", "failed"):
            self._agent_syncs.labels(result)
        for reason in DEATH_REASONS:
            self._deaths.labels(reason)
        for refusal in SSH_REFUSALS:
            self._ssh_refusals.labels(refusal)

    # ---- wakes ---------------------------------------------------------------------------

    def wake_stage(self, stage: Stage, how: How, trigger: Trigger, seconds: float) -> None:
        self._wake.labels(stage, how, trigger).observe(seconds)

    def wake_failed(self, trigger: Trigger) -> None:
        self._wake_failures.labels(trigger).inc()

    # ---- snapshots -----------------------------------------------------------------------

    def snapshot_captured(self, automatic: bool, seconds: float) -> None:
        """The guest's state is saved and its VMM ended (the snapshot call returns soon)."""
        self._capture.labels(_flag(automatic)).observe(seconds)

    def snapshot_stored(self, automatic: bool, seconds: float, stored_bytes: int) -> None:
        """A captured snapshot's background store ended with its row `stored`."""
        flag = _flag(automatic)
        self._store.labels(flag).observe(seconds)
        self._stored_bytes.labels(flag).inc(stored_bytes)

    def deduplicated(self, saved_bytes: int) -> None:
        """A snapshot's pages the chunk store did not write because it held them already."""
        self._deduplicated.inc(saved_bytes)

    def restored(self, hot: bool, seconds: float) -> None:
        self._restore.labels("hot" if hot else "store").observe(seconds)

    def standbys(self, count: int) -> None:
        self._standbys.set(count)

    def snapshot_failed(self, step: Step) -> None:
        self._snapshot_failures.labels(step).inc()

    # ---- VMs -----------------------------------------------------------------------------

    def set_vm_states(self, counts: Mapping[str, int] | None) -> None:
        """Every state's count (0 for those no VM is in); None: unknown (the series go)."""
        self._vms.clear()
        if counts is None:
            return
        for state in sorted({*(s.value for s in State), *counts}):
            self._vms.labels(state).set(counts.get(state, 0))

    def vm_created(self, how: Creation, seconds: float) -> None:
        self._create.labels(how).observe(seconds)

    def vm_died(self, reason: str | None) -> None:
        if reason is None:
            reason = "unknown"
        elif reason not in DEATH_REASONS:
            reason = "other"
        self._deaths.labels(reason).inc()

    def agent_synced(self, ok: bool) -> None:
        self._agent_syncs.labels("ok" if ok else "failed").inc()

    # ---- proxy and gateway ---------------------------------------------------------------

    def proxy_refused(self, status: int) -> None:
        self._proxy_refusals.labels(str(status)).inc()

    def proxy_timed_out(self, phase: str) -> None:
        self._proxy_timeouts.labels(phase).inc()

    def ssh_connected(self) -> None:
        self._ssh_connections.inc()

    def ssh_refused(self, reason: SshRefusal) -> None:
        self._ssh_refusals.labels(reason).inc()
