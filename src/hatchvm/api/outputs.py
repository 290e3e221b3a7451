"""What the API answers: one pydantic model per object, built from database rows.

The models are the response schemas of /openapi.json, and FastAPI checks every answer against
them on its way out, so the document and the answers cannot drift apart."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, WithJsonSchema

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
