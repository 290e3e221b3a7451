"""The one transition table: which operation is allowed in which lifecycle state."""

from __future__ import annotations

from enum import StrEnum

from hatchvm.errors import Conflict


class State(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    SNAPSHOTTING = "snapshotting"
    SNAPSHOTTED = "snapshotted"
    RESTORING = "restoring"
    ERROR = "error"


class Op(StrEnum):
    START = "start"
    STOP = "stop"
    DELETE = "delete"
    SNAPSHOT = "snapshot"
    RESTORE = "restore"
    FORK = "fork"


# Operations run under the VM's lock, so transitional states (starting, stopping, ...) are only
# seen here after a daemon crash; reconciliation resolves them before the API opens.
ALLOWED: dict[Op, frozenset[State]] = {
    # From error too: a VM whose wakes kept failing still has its disk (and snapshots), and
    # its owner may boot it afresh or pick a snapshot rather than lose it (VMService.start).
    Op.START: frozenset({State.STOPPED, State.ERROR}),
    Op.STOP: frozenset({State.RUNNING}),
    Op.DELETE: frozenset(State),
    Op.SNAPSHOT: frozenset({State.RUNNING}),
    Op.RESTORE: frozenset({State.SNAPSHOTTED, State.ERROR}),
    Op.FORK: frozenset({State.RUNNING, State.SNAPSHOTTED}),
}

# The state to name in the 409 message ("vm is stopped, must be running"); the way out of
# error is not named there (the error's own state_reason says what happened).
_EXPECTED: dict[Op, str] = {
    Op.START: "stopped",
    Op.STOP: "running",
    Op.DELETE: "any state",
    Op.SNAPSHOT: "running",
    Op.RESTORE: "snapshotted",
    Op.FORK: "running or snapshotted",
}


def guard(op: Op, state: str) -> None:
    """Raise Conflict unless op is allowed in state."""
    if State(state) not in ALLOWED[op]:
        raise Conflict(f"vm is {state}, must be {_EXPECTED[op]}")
