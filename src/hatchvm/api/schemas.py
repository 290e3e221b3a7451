"""Input models (strict: wrong types are refused, not coerced) and output rendering."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from hatchvm.core.subdomains import subdomain_problem
from hatchvm.db.models import VM, Image, Route, Snapshot
from hatchvm.ids import DEFAULT_IMAGE_ID
from hatchvm.net.egress import Egress
from hatchvm.snapshots.manifest import SnapshotManifest
from hatchvm.timefmt import rfc3339

_BOOT_ARG = re.compile(r"^[\x21-\x7e]+$")


class StrictInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class VMCreate(StrictInput):
    image_id: str = Field(default=DEFAULT_IMAGE_ID, min_length=1, max_length=64)
    vcpu_count: int | None = Field(default=None, ge=1, le=32)
    mem_mib: int | None = Field(default=None, ge=128, le=65536)
    enable_network: bool = True
    # Default: "internet" for a networked VM, "none" for one without a NIC.
    egress: Literal["internet", "none"] | None = None
    user_data: str | None = Field(default=None, max_length=65536)
    boot_args: str | None = Field(default=None, max_length=1024)
    restart: Literal["no", "on-failure"] = "no"

    @field_validator("boot_args")
    @classmethod
    def _boot_args(cls, value: str | None) -> str | None:
        if value is None:
            return None
        words = value.split()
        for word in words:
            if not _BOOT_ARG.match(word):
                raise ValueError("must be printable ASCII kernel parameters")
            if word.startswith("hatch."):
                raise ValueError(f"{word.split('=')[0]} is set by hatchd and cannot be given")
        return " ".join(words) or None

    @field_validator("egress")
    @classmethod
    def _egress_needs_network(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value == Egress.INTERNET and info.data.get("enable_network") is False:
            raise ValueError("internet needs a network (enable_network is false)")
        return value

    @property
    def egress_or_default(self) -> Egress:
        if self.egress is not None:
            return Egress(self.egress)
        return Egress.INTERNET if self.enable_network else Egress.NONE


def render_vm(vm: VM) -> dict[str, Any]:
    return {
        "id": vm.id,
        "image_id": vm.image_id,
        "state": vm.state,
        "vcpu_count": vm.vcpu_count,
        "mem_mib": vm.mem_mib,
        "guest_ip": vm.guest_ip,
        "guest_mac": vm.guest_mac,
        "ssh_port": vm.ssh_port,
        "enable_network": vm.enable_network,
        "egress": vm.egress,
        "boot_args": vm.boot_args,
        "state_reason": vm.state_reason,
        "restart": vm.restart,
        "last_exit": json.loads(vm.last_exit) if vm.last_exit else None,
        "created_at": rfc3339(vm.created_at),
        "updated_at": rfc3339(vm.updated_at),
    }


def render_image(image: Image) -> dict[str, Any]:
    return {
        "id": image.id,
        "kernel_path": image.kernel_path,
        "vmlinux_path": image.vmlinux_path,
        "initrd_path": image.initrd_path,
        "rootfs_path": image.rootfs_path,
        "boot_args": image.boot_args,
        "created_at": rfc3339(image.created_at),
    }


def render_snapshot(snap: Snapshot) -> dict[str, Any]:
    manifest = SnapshotManifest.parse(snap.manifest)
    return {
        "id": snap.id,
        "vm_id": snap.vm_id,
        "size_bytes": snap.size_bytes,
        "automatic": snap.automatic,
        "storage": {"backend": snap.storage, "location": snap.location},
        "artifacts": {
            name: {"size_bytes": a.stored_size, "raw_bytes": a.raw_size, "sha256": a.sha256}
            for name, a in manifest.artifacts.items()
        },
        "created_at": rfc3339(snap.created_at),
    }


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    snapshot_id: str | None = Field(default=None, min_length=1, max_length=64)


class RouteCreate(StrictInput):
    subdomain: str | None = None
    target_port: int = Field(ge=1, le=65535)
    auto_wake: bool = True

    @field_validator("subdomain")
    @classmethod
    def _subdomain(cls, value: str | None) -> str | None:
        if value is not None and (problem := subdomain_problem(value)):
            raise ValueError(problem)
        return value


def render_route(route: Route, url: str) -> dict[str, Any]:
    return {
        "id": route.id,
        "vm_id": route.vm_id,
        "subdomain": route.subdomain,
        "target_port": route.target_port,
        "auto_wake": route.auto_wake,
        "url": url,
        "created_at": rfc3339(route.created_at),
        "updated_at": rfc3339(route.updated_at),
    }
