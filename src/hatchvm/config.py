"""Every HATCH_* setting in one place, with defaults that work on one machine."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _parse_addr(value: str) -> tuple[str, int]:
    """':8080' -> ('0.0.0.0', 8080); '127.0.0.1:9' -> ('127.0.0.1', 9)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT or :PORT, got {value!r}")
    return (host.strip("[]") or "0.0.0.0", int(port))


class Settings(BaseSettings):
    """Daemon configuration read from HATCH_* variables (and a .env file)."""

    model_config = SettingsConfigDict(env_prefix="HATCH_", env_file=".env", extra="ignore")

    http_addr: str = ":8080"
    data_dir: Path = Path("./data")
    database_url: str = ""  # empty: SQLite file inside data_dir
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    vmm: Literal["auto", "qemu", "firecracker"] = "auto"
    qemu_bin: str = "qemu-system-x86_64"
    qemu_accel: Literal["auto", "kvm", "tcg"] = "auto"
    firecracker_bin: str = "firecracker"
    stop_timeout: float = Field(default=20.0, gt=0)

    bridge_name: str = Field(default="hatchbr0", pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    bridge_cidr: str = "172.16.0.1/24"
    tap_prefix: str = Field(default="hv", pattern=r"^[a-z]{1,4}$")
    nft_table: str = Field(default="hatchvm", pattern=r"^[A-Za-z0-9_]{1,32}$")
    guest_dns: str = "1.1.1.1"

    default_vcpu: int = Field(default=1, ge=1, le=32)
    default_mem_mib: int = Field(default=512, ge=128, le=65536)
    max_vms_per_user: int = Field(default=5, ge=0)
    max_snapshots_per_vm: int = Field(default=10, ge=0)
    vm_disk_mib: int = Field(default=1024, ge=64)

    proxy_addr: str = ":9090"
    proxy_base_domain: str = "hatch.local"
    proxy_wake_timeout: float = Field(default=60.0, gt=0)
    ssh_port_min: int = Field(default=16000, ge=1, le=65535)
    ssh_port_max: int = Field(default=26000, ge=1, le=65535)
    ssh_allowed_cidr: str = "0.0.0.0/0"  # one network or several, comma-separated
    ssh_host: str = "0.0.0.0"  # where the SSH gateway's per-VM ports listen
    idle_check_interval: float = Field(default=300.0, gt=0)
    idle_timeout: float = Field(default=2700.0, gt=0)

    better_auth_url: str = ""
    better_auth_verify_url: str = ""
    auth_cache_ttl: float = Field(default=30.0, ge=0)

    s3_endpoint: str = ""
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    snapshot_zstd_level: int = Field(default=3, ge=1, le=19)

    # Where downloaded .deb files are kept between image builds.
    cache_dir: Path = Path.home() / ".cache" / "hatchvm"

    @field_validator("http_addr", "proxy_addr")
    @classmethod
    def _valid_addr(cls, value: str) -> str:
        _parse_addr(value)
        return value

    @field_validator("bridge_cidr")
    @classmethod
    def _valid_bridge(cls, value: str) -> str:
        iface = ipaddress.IPv4Interface(value)
        if iface.network.num_addresses < 8 or iface.ip in (
            iface.network.network_address,
            iface.network.broadcast_address,
        ):
            raise ValueError("needs a host address inside a network of at least 8 addresses")
        return value

    @field_validator("ssh_allowed_cidr")
    @classmethod
    def _valid_cidr(cls, value: str) -> str:
        for part in value.split(","):
            ipaddress.ip_network(part.strip(), strict=False)
        return value

    @property
    def ssh_allowed_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [
            ipaddress.ip_network(p.strip(), strict=False) for p in self.ssh_allowed_cidr.split(",")
        ]

    @property
    def http_host_port(self) -> tuple[str, int]:
        return _parse_addr(self.http_addr)

    @property
    def proxy_host_port(self) -> tuple[str, int]:
        return _parse_addr(self.proxy_addr)

    @property
    def bridge_interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self.bridge_cidr)

    @property
    def sqlalchemy_url(self) -> str:
        url = self.database_url
        if not url:
            return f"sqlite+aiosqlite:///{self.data_dir.resolve() / 'hatchvm.db'}"
        if url.startswith(("postgresql://", "postgres://")):
            return "postgresql+asyncpg://" + url.split("://", 1)[1]
        if url.startswith("sqlite:///"):
            return "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
        return url

    @property
    def snapshots_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def vms_dir(self) -> Path:
        return self.data_dir / "vms"


class ConfigError(Exception):
    """A malformed HATCH_* value; the message names the variable."""


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's report into one line per bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "HATCH_" + str(err["loc"][0]).upper() if err["loc"] else "HATCH_*"
            lines.append(f"{name}: {err['msg']}")
        raise ConfigError("; ".join(lines)) from None
