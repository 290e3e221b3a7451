"""Database tables. Allocations (IP, MAC, TAP, SSH port) are unique columns on the VM row,
so the database itself refuses to hand one to two VMs, across restarts too."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    """Now, to the microsecond: updated_at marks a VM's incarnation (the proxy pools guest
    connections by it) and listings are newest first, both within one second too. The API
    shows whole seconds."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC and always hands back aware datetimes (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Image(Base):
    __tablename__ = "images"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kernel_path: Mapped[str] = mapped_column(Text)
    vmlinux_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    initrd_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    rootfs_path: Mapped[str] = mapped_column(Text)
    boot_args: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the current one
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class VM(Base):
    __tablename__ = "vms"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id"))
    # The image version the VM was made with: its disk and snapshots need exactly these files.
    image_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    vcpu_count: Mapped[int] = mapped_column(Integer)
    mem_mib: Mapped[int] = mapped_column(Integer)
    enable_network: Mapped[bool] = mapped_column(Boolean)
    egress: Mapped[str] = mapped_column(String(16), default="internet")  # core.network.Egress
    user_data: Mapped[str | None] = mapped_column(Text, nullable=True)
    boot_args: Mapped[str | None] = mapped_column(Text, nullable=True)
    guest_ip: Mapped[str | None] = mapped_column(String(45), unique=True, nullable=True)
    guest_mac: Mapped[str | None] = mapped_column(String(17), unique=True, nullable=True)
    tap_name: Mapped[str | None] = mapped_column(String(15), unique=True, nullable=True)
    ssh_port: Mapped[int | None] = mapped_column(Integer, unique=True, nullable=True)
    # Why the VM last failed or was stopped behind the user's back; shown in the API.
    state_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    restart: Mapped[str] = mapped_column(String(16), default="no")  # "no" | "on-failure"
    # How the VMM process last ended behind hatchd's back (JSON: when, why, console tail).
    last_exit: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_activity_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


# Snapshot.status
STORING = "storing"
STORED = "stored"
FAILED = "failed"


class Snapshot(Base):
    """A captured snapshot. Its row is written once the guest's state is captured (status
    "storing"); its manifest names chunks only once every one of them is stored ("stored").
    A snapshot that could not be stored is "failed" and never restored."""

    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage: Mapped[str] = mapped_column(String(16))  # "local" or "s3"
    location: Mapped[str] = mapped_column(Text)
    manifest: Mapped[str] = mapped_column(Text)  # SnapshotManifest JSON
    automatic: Mapped[bool] = mapped_column(Boolean, default=False)  # taken by the idle reaper
    status: Mapped[str] = mapped_column(String(16), default="stored", server_default="stored")
    status_reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # why it failed
    # Microseconds kept: snapshots are listed newest first and may come in quick succession.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=lambda: datetime.now(UTC))


class Route(Base):
    """An HTTP route: <subdomain>.<HATCH_PROXY_BASE_DOMAIN> -> the VM's target_port."""

    __tablename__ = "routes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    subdomain: Mapped[str] = mapped_column(String(63), unique=True)
    target_port: Mapped[int] = mapped_column(Integer)
    auto_wake: Mapped[bool] = mapped_column(Boolean, default=True)
    # Microseconds kept: "newest first" must hold for routes made in the same second.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=lambda: datetime.now(UTC))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=lambda: datetime.now(UTC))
