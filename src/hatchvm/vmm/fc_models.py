"""The bodies of the Firecracker API calls hatchvm makes, written from Firecracker's swagger
file (definitions of the same names). Requests forbid unknown fields, as Firecracker does;
answers ignore fields a newer Firecracker may add."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def body(self) -> dict[str, object]:
        """The JSON body: optional fields left unset are not sent (Firecracker's defaults)."""
        return self.model_dump(mode="json", exclude_none=True)


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class BootSource(_Request):
    kernel_image_path: str
    initrd_path: str | None = None
    boot_args: str | None = None


class Drive(_Request):
    drive_id: str
    is_root_device: bool
    path_on_host: str
    is_read_only: bool
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    io_engine: Literal["Sync", "Async"] | None = None


class MachineConfiguration(_Request):
    vcpu_count: int = Field(ge=1, le=32)
    mem_size_mib: int
    smt: bool | None = None
    track_dirty_pages: bool | None = None


class NetworkInterface(_Request):
    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None


class Logger(_Request):
    log_path: str
    level: Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"] | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None


class Metrics(_Request):
    metrics_path: str


class SerialDevice(_Request):
    serial_out_path: str


class EntropyDevice(_Request):
    pass


class InstanceActionInfo(_Request):
    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]


class Vm(_Request):
    state: Literal["Paused", "Resumed"]


class SnapshotCreateParams(_Request):
    mem_file_path: str
    snapshot_path: str
    snapshot_type: Literal["Full", "Diff"] | None = None


class MemoryBackend(_Request):
    backend_type: Literal["File", "Uffd"]
    backend_path: str


class SnapshotLoadParams(_Request):
    snapshot_path: str
    mem_backend: MemoryBackend
    resume_vm: bool | None = None


class InstanceInfo(_Answer):
    app_name: str
    id: str
    state: Literal["Not started", "Running", "Paused"]
    vmm_version: str


class FaultMessage(_Answer):
    fault_message: str | None = None
