"""What the API answers: one pydantic model per object, built from database rows.

The models are the response schemas of /openapi.json, and FastAPI checks every answer against
them on its way out, so the document and the answers cannot drift apart."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, WithJsonSchema

from hatchvm.agent.exec import Exit, Result
from hatchvm.agent.exec import Process as AgentProcess
from hatchvm.agent.files import Entry, FileStat
from hatchvm.core.states import State
from hatchvm.db import models as db
from hatchvm.snapshots.manifest import SnapshotManifest
from hatchvm.timefmt import rfc3339

Timestamp = Annotated[
    str,
    WithJsonSchema({"type": "string", "format": "date-time", "examples": ["2026-03-06T12:00:00Z"]}),
]


class Output(BaseModel):
    # Closed objects: the document lists every field an answer has.
    model_config = ConfigDict(extra="forbid")


class LastExit(Output):
    """How the VM's VMM process last ended behind hatchd's back."""

    at: Timestamp
    reason: str | None  # guest-shutdown, guest-reset, guest-panic, host-signal; null: unknown
    description: str
    exit_code: int | None
    signal: int | None
    console: list[str]  # the console's last lines


class VM(Output):
    id: str
    image_id: str
    image_version: str | None  # the image content the VM was made with, and keeps
    state: State
    vcpu_count: int
    mem_mib: int
    guest_ip: str | None
    guest_mac: str | None
    ssh_port: int | None
    enable_network: bool
    egress: Literal["internet", "none"]
    boot_args: str | None
    state_reason: str | None
    restart: Literal["no", "on-failure"]
    last_exit: LastExit | None
    created_at: Timestamp
    updated_at: Timestamp


class Artifact(Output):
    size_bytes: int  # compressed bytes a restore of it reads (its chunks' blocks, each once)
    raw_bytes: int
    sha256: str


class SnapshotArtifacts(Output):
    mem: Artifact
    disk: Artifact
    state: Artifact


class SnapshotStorage(Output):
    backend: Literal["local", "s3"]
    location: str


class Snapshot(Output):
    id: str
    vm_id: str
    # Captured, its files being stored in the background; stored; or failed (never restored).
    status: Literal["storing", "stored", "failed"]
    status_reason: str | None  # why it failed
    size_bytes: int  # bytes it added to the store: its new chunks and its listing (0 until stored)
    automatic: bool
    storage: SnapshotStorage
    artifacts: SnapshotArtifacts | None  # once stored
    created_at: Timestamp


class Route(Output):
    id: str
    vm_id: str
    subdomain: str
    target_port: int
    auto_wake: bool
    url: str
    created_at: Timestamp
    updated_at: Timestamp


class Image(Output):
    id: str
    version: str | None  # the current version: what new VMs get
    kernel_path: str
    vmlinux_path: str | None
    initrd_path: str | None
    rootfs_path: str
    boot_args: str
    created_at: Timestamp


class Deleted(Output):
    status: Literal["deleted"] = "deleted"


class Health(Output):
    status: Literal["ok"]
    vmm: str
    accel: str
    database: Literal["ok"]
    auth: Literal["local", "better-auth"]


class Error(Output):
    error: str


class ExecResult(Output):
    exit_code: int | None  # null when a signal ended the command
    signal: int | None  # the signal that ended it (9 after a timeout)
    timed_out: bool
    stdout: str  # UTF-8, invalid bytes replaced by U+FFFD
    stderr: str
    truncated: bool  # a stream went past the 1 MiB kept


class ExecTimedOut(ExecResult):
    error: str  # "the command timed out after 1 s (timeout_s) and was killed"


class ExecEvent(Output):
    """One line of a streamed exec (application/x-ndjson)."""

    type: Literal["started", "stdout", "stderr", "exit", "error"]
    pid: int | None = None  # started
    data: str | None = None  # stdout, stderr: the next text the command wrote
    exit_code: int | None = None  # exit
    signal: int | None = None  # exit
    timed_out: bool | None = None  # exit
    error: str | None = None  # error: why the stream ended without an exit


class Process(Output):
    pid: int
    cmd: str
    state: Literal["running", "exited"]
    exit_code: int | None
    signal: int | None
    timed_out: bool
    started_at: Timestamp
    ended_at: Timestamp | None
    stdout_bytes: int  # written in all
    stderr_bytes: int


class ProcessOutput(Process):
    stdout: str  # the newest 256 KiB the guest kept
    stderr: str
    truncated: bool  # older output was dropped


class FileInfo(Output):
    path: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: str  # permission bits, octal: "0644"
    mtime: Timestamp


class FileEntry(Output):
    name: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: str
    mtime: Timestamp


class FileList(Output):
    path: str
    entries: list[FileEntry]  # sorted by name
    truncated: bool  # the directory holds more than the 10000 listed


def render_vm(vm: db.VM) -> VM:
    return VM(
        id=vm.id,
        image_id=vm.image_id,
        image_version=vm.image_version,
        state=State(vm.state),
        vcpu_count=vm.vcpu_count,
        mem_mib=vm.mem_mib,
        guest_ip=vm.guest_ip,
        guest_mac=vm.guest_mac,
        ssh_port=vm.ssh_port,
        enable_network=vm.enable_network,
        egress=vm.egress,
        boot_args=vm.boot_args,
        state_reason=vm.state_reason,
        restart=vm.restart,
        last_exit=LastExit.model_validate(json.loads(vm.last_exit)) if vm.last_exit else None,
        created_at=rfc3339(vm.created_at),
        updated_at=rfc3339(vm.updated_at),
    )


def render_image(image: db.Image) -> Image:
    return Image(
        id=image.id,
        version=image.version,
        kernel_path=image.kernel_path,
        vmlinux_path=image.vmlinux_path,
        initrd_path=image.initrd_path,
        rootfs_path=image.rootfs_path,
        boot_args=image.boot_args,
        created_at=rfc3339(image.created_at),
    )


def render_snapshot(snap: db.Snapshot) -> Snapshot:
    artifacts = None
    if snap.status == db.STORED:  # the others' manifests name no chunks yet (or ever)
        records = SnapshotManifest.parse(snap.manifest).artifacts
        artifacts = SnapshotArtifacts(
            **{
                name: Artifact(size_bytes=a.stored_size, raw_bytes=a.raw_size, sha256=a.sha256)
                for name, a in records.items()
            }
        )
    return Snapshot(
        id=snap.id,
        vm_id=snap.vm_id,
        status=snap.status,  # type: ignore[arg-type]
        status_reason=snap.status_reason,
        size_bytes=snap.size_bytes,
        automatic=snap.automatic,
        storage=SnapshotStorage(backend=snap.storage, location=snap.location),  # type: ignore[arg-type]
        artifacts=artifacts,
        created_at=rfc3339(snap.created_at),
    )


def render_route(route: db.Route, url: str) -> Route:
    return Route(
        id=route.id,
        vm_id=route.vm_id,
        subdomain=route.subdomain,
        target_port=route.target_port,
        auto_wake=route.auto_wake,
        url=url,
        created_at=rfc3339(route.created_at),
        updated_at=rfc3339(route.updated_at),
    )


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _at(ns: int) -> str:
    """A guest's time (whatever its clock says, and the guest may say anything)."""
    try:
        return rfc3339(datetime.fromtimestamp(ns / 1e9, UTC))
    except (ValueError, OverflowError, OSError):
        return rfc3339(datetime.fromtimestamp(0, UTC))


def render_exec(result: Result) -> ExecResult:
    return ExecResult(
        exit_code=result.exit.exit_code,
        signal=result.exit.signal,
        timed_out=result.exit.timed_out,
        stdout=_text(result.stdout),
        stderr=_text(result.stderr),
        truncated=result.truncated,
    )


def render_exit(exit: Exit) -> ExecEvent:
    return ExecEvent(
        type="exit", exit_code=exit.exit_code, signal=exit.signal, timed_out=exit.timed_out
    )


def _process_fields(p: AgentProcess) -> dict[str, object]:
    return {
        "pid": p.pid,
        "cmd": p.cmd,
        "state": "running" if p.running else "exited",
        "exit_code": p.exit_code,
        "signal": p.signal,
        "timed_out": p.timed_out,
        "started_at": _at(p.started_ns),
        "ended_at": _at(p.ended_ns) if p.ended_ns else None,
        "stdout_bytes": p.stdout_bytes,
        "stderr_bytes": p.stderr_bytes,
    }


def render_process(p: AgentProcess) -> Process:
    return Process.model_validate(_process_fields(p))


def render_process_output(p: AgentProcess, stdout: bytes, stderr: bytes) -> ProcessOutput:
    truncated = len(stdout) < p.stdout_bytes or len(stderr) < p.stderr_bytes
    return ProcessOutput.model_validate(
        {
            **_process_fields(p),
            "stdout": _text(stdout),
            "stderr": _text(stderr),
            "truncated": truncated,
        }
    )


def _stat_fields(stat: FileStat) -> dict[str, object]:
    return {
        "kind": stat.kind,
        "size": stat.size,
        "mode": f"{stat.mode:04o}",
        "mtime": _at(stat.mtime_ns),
    }


def render_file(path: str, stat: FileStat) -> FileInfo:
    return FileInfo.model_validate({"path": path, **_stat_fields(stat)})


def render_listing(path: str, entries: list[Entry], truncated: bool) -> FileList:
    return FileList(
        path=path,
        entries=[
            FileEntry.model_validate({"name": e.name, **_stat_fields(e.stat)}) for e in entries
        ],
        truncated=truncated,
    )
