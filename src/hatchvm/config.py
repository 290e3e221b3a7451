"""Every HATCH_* setting in one place, with defaults that work on one machine."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import (
    Field,
    HttpUrl,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

_HTTP_URL = TypeAdapter(HttpUrl)
_MAX_UID = 0xFFFF_FFFE  # (uid_t)-1 means "unchanged" to chown and setuid
_T = TypeVar("_T")


def _parse_addr(value: str) -> tuple[str, int]:
    """':8080' -> ('0.0.0.0', 8080); '127.0.0.1:9' -> ('127.0.0.1', 9)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT or :PORT, got {value!r}")
    return (host.strip("[]") or "0.0.0.0", int(port))


# What HATCH_DATABASE_URL may be; said in every refusal.
_DATABASE_FORMS = (
    "expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE, "
    "postgresql://USER@/DATABASE?host=/SOCKET/DIR, or sqlite:///PATH"
)
# Query parameters hatchd hands to asyncpg: where the server is, TLS and a statement timeout.
# sslmode is libpq's name for asyncpg's ssl (same values: disable ... verify-full).
_POSTGRES_PARAMS = {"host", "port", "ssl", "sslmode", "command_timeout"}


def _sqlalchemy_database_url(value: str, data_dir: Path) -> str:
    """HATCH_DATABASE_URL as SQLAlchemy's async drivers want it (ValueError: not usable)."""
    if not value:
        return f"sqlite+aiosqlite:///{data_dir / 'hatchvm.db'}"
    # Imported here: the CLI's commands that never touch a database start without SQLAlchemy.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError(f"not a URL: {_DATABASE_FORMS}") from None
    if url.drivername in ("sqlite", "sqlite+aiosqlite"):
        if not url.database or url.database == ":memory:":
            raise ValueError(f"SQLite needs a file: {_DATABASE_FORMS}")
        return f"sqlite+aiosqlite:///{Path(url.database).resolve()}"
    if url.drivername not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(f"unsupported database {url.drivername!r}: {_DATABASE_FORMS}")
    query = dict(url.query)
    unknown = sorted(set(query) - _POSTGRES_PARAMS)
    if unknown:
        raise ValueError(
            f"unsupported parameter {unknown[0]!r} (known: {', '.join(sorted(_POSTGRES_PARAMS))})"
        )
    if "sslmode" in query:
        if "ssl" in query:
            raise ValueError("give ssl or sslmode, not both")
        query["ssl"] = query.pop("sslmode")
    url = url.set(drivername="postgresql+asyncpg", query=query)
    return url.render_as_string(hide_password=False)


def _ipv4_list(value: str, parse: Callable[[str], _T]) -> list[_T]:
    """'a, b,' -> [parse('a'), parse('b')]; guests have IPv4 only, so IPv6 is refused."""
    items = []
    for part in (p.strip() for p in value.split(",")):
        if part:
            try:
                items.append(parse(part))
            except ValueError as exc:
                raise ValueError(f"{part!r}: {exc} (expected IPv4, comma-separated)") from None
    return items


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(value: str) -> list[Network]:
    """'10.0.0.0/8, 192.168.1.1' -> networks; an empty string is none."""
    return [ipaddress.ip_network(p.strip(), strict=False) for p in value.split(",") if p.strip()]


class Settings(BaseSettings):
    """Daemon configuration read from HATCH_* variables (and a .env file)."""

    model_config = SettingsConfigDict(env_prefix="HATCH_", env_file=".env", extra="ignore")

    http_addr: str = Field(default=":8080", description="API listen address (HOST:PORT or :PORT)")
    api_max_connections: int = Field(
        default=1024,
        ge=1,
        description="client connections the API holds open at once (503 beyond; lowered to "
        "what the open-file limit allows)",
    )
    api_max_connections_per_address: int = Field(
        default=256,
        ge=1,
        description="API connections from one address (an IPv6 /64) at once (429 beyond)",
    )
    api_head_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds an API client has to send a whole request head, counted from the "
        "connection or the end of its previous response (408)",
    )
    metrics_addr: str = Field(
        default="",
        description="where GET /metrics (Prometheus, no API key) is served: empty on the API's "
        "address; HOST:PORT or :PORT for a listener of its own (then not on the API's)",
    )
    data_dir: Path = Field(
        default=Path("./data"),
        description="database, images, VM disks and consoles (made absolute at start-up)",
    )
    database_url: str = Field(
        default="",
        description="empty: SQLite in the data dir; or postgresql://USER[:PASSWORD]@HOST[:PORT]"
        "/DATABASE, postgresql://USER@/DATABASE?host=/SOCKET/DIR, sqlite:///PATH",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="least severe log level shown"
    )
    log_format: Literal["auto", "console", "json"] = Field(
        default="auto",
        description="auto: readable lines on a terminal, JSON lines otherwise (always on stderr)",
    )

    vmm: Literal["auto", "qemu", "firecracker"] = Field(
        default="auto",
        description="which VMM runs the guests: auto takes firecracker where KVM works and its "
        "binary is installed, qemu otherwise",
    )
    qemu_bin: str = Field(default="qemu-system-x86_64", description="the QEMU binary")
    qemu_accel: Literal["auto", "kvm", "tcg"] = Field(
        default="auto",
        description="auto probes whether KVM really runs a guest and falls back to TCG",
    )
    qemu_tb_size_mib: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="TCG translation cache per VM in MiB (QEMU's own default is 1 GiB)",
    )
    cgroups: Literal["auto", "required", "off"] = Field(
        default="auto",
        description="a cgroup per VM limiting memory and CPU: auto uses them when the host "
        "allows (warns otherwise), required refuses to start without",
    )
    cgroup_parent: str = Field(
        default="hatchvm",
        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*$",
        description="the VMs' cgroups are <this>/<vm_id>, below the cgroup root",
    )
    firecracker_bin: str = Field(default="firecracker", description="the Firecracker binary")
    firecracker_jailer: str = Field(
        default="",
        description="Firecracker's jailer binary: set, each VM's Firecracker runs through it as "
        "its own uid and gid, chrooted, in a cgroup with the VM's limits (hatchd runs as root); "
        "empty: unjailed",
    )
    firecracker_chroot_base: Path | None = Field(
        default=None,
        description="where the jailer builds the VMs' jails (<this>/<Firecracker's file name>/"
        "<vm id>/root); on the data dir's filesystem (VM files are hard-linked in, with POSIX "
        "ACLs); empty: <data dir>/jailer",
    )
    firecracker_uid_base: int = Field(
        default=900_000,
        ge=1,
        le=_MAX_UID,
        description="first uid (and gid: the same number) of the range jailed Firecrackers run "
        "as, one per running VM; no existing user or group may have one",
    )
    firecracker_uid_count: int = Field(
        default=10_000,
        ge=1,
        description="how many uids that range holds: the most VMs running jailed at once",
    )
    stop_timeout: float = Field(
        default=20.0, gt=0, description="seconds a guest gets to power off before it is killed"
    )
    agent_timeout: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="seconds a restore waits for the guest agent to set the guest's clock and "
        "reseed its RNG (the VM runs either way, with a warning in state_reason)",
    )
    agent_ready_timeout: float = Field(
        default=60.0,
        gt=0,
        le=600,
        description="seconds an exec or file call waits for the guest agent of a VM that has "
        "just booted or woken to say hello (503 after)",
    )

    templates: bool = Field(
        default=True,
        description="warm templates: after the first create of a VM shape (image version, "
        "vCPUs, memory, networking, boot_args, disk size) hatchd boots and snapshots a template "
        "of it in the background, and later creates of that shape start from it instead of "
        "booting (false: every create boots)",
    )
    max_templates: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="warm templates kept (one per shape): beyond it the least recently used goes, "
        "and no more builds are queued",
    )

    bridge_name: str = Field(
        default="hatchbr0", pattern=r"^[A-Za-z0-9_.-]{1,15}$", description="the VMs' bridge"
    )
    bridge_cidr: str = Field(
        default="172.16.0.1/24", description="the bridge's address and the guests' network"
    )
    tap_prefix: str = Field(
        default="hv", pattern=r"^[a-z]{1,4}$", description="name prefix of the VMs' TAP devices"
    )
    nft_table: str = Field(
        default="hatchvm",
        pattern=r"^[A-Za-z0-9_]{1,32}$",
        description="name of hatchd's own nftables tables",
    )
    guest_dns: str = Field(
        default="1.1.1.1",
        description="DNS servers given to guests (IPv4, comma-separated); reachable on port 53 "
        "whatever the egress lists say",
    )
    egress_allow_cidrs: str = Field(
        default="",
        description="networks guests may reach although the default deny list holds them "
        "(IPv4, comma-separated; e.g. a private package mirror)",
    )
    egress_deny_cidrs: str = Field(
        default="",
        description="more networks guests may not reach (IPv4, comma-separated; wins over allow)",
    )

    default_vcpu: int = Field(default=1, ge=1, le=32, description="vCPUs of a VM that names none")
    default_mem_mib: int = Field(
        default=512, ge=128, le=65536, description="memory (MiB) of a VM that names none"
    )
    max_vms_per_user: int = Field(default=5, ge=0, description="VM quota per user (403 beyond)")
    max_snapshots_per_vm: int = Field(
        default=10, ge=0, description="snapshot quota per VM (403 beyond)"
    )
    console_max_bytes: int = Field(
        default=16 << 20,
        ge=1 << 20,
        description="bytes of each VM's console kept on disk (the newest output)",
    )
    vm_disk_mib: int = Field(
        default=1024, ge=64, description="size of each VM's writable disk in MiB (sparse)"
    )
    max_vcpus_per_user: int = Field(
        default=8, ge=0, description="total vCPUs of one user's VMs (403 beyond)"
    )
    max_mem_mib_per_user: int = Field(
        default=8192, ge=0, description="total memory (MiB) of one user's VMs (403 beyond)"
    )
    max_disk_mib_per_user: int = Field(
        default=10240,
        ge=0,
        description="total size (MiB) of one user's writable VM disks (403 beyond)",
    )
    max_snapshot_mib_per_user: int = Field(
        default=20480,
        ge=0,
        description="stored snapshots (MiB) of one user; no new snapshot once reached (403)",
    )
    host_mem_reserve_mib: int = Field(
        default=1024,
        ge=0,
        description="host memory (MiB) VMs never get: a create/start/restore/wake that would "
        "eat into it is refused (503)",
    )
    host_disk_reserve_mib: int = Field(
        default=2048,
        ge=0,
        description="free space (MiB) kept in the data dir: a VM whose disk and memory file "
        "would eat into it is refused (503)",
    )

    proxy_addr: str = Field(default=":9090", description="the HTTP proxy's listen address")
    proxy_base_domain: str = Field(
        default="hatch.local", description="routes answer at <subdomain>.<this domain>"
    )
    proxy_wake_timeout: float = Field(
        default=60.0, gt=0, description="seconds a request may wait for a sleeping VM to wake"
    )
    proxy_max_connections: int = Field(
        default=4096,
        ge=1,
        description="client connections the proxy holds open at once (503 beyond; lowered to "
        "what the open-file limit allows)",
    )
    proxy_max_connections_per_address: int = Field(
        default=256,
        ge=1,
        description="client connections from one address (an IPv6 /64) at once (429 beyond); "
        "behind a trusted proxy: requests in progress per forwarded client address",
    )
    proxy_max_head_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="largest request head (431 beyond) and guest response head (502 beyond)",
    )
    proxy_head_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds a client has to send a whole request head, counted from the "
        "connection or the head's first byte (408)",
    )
    proxy_keepalive_timeout: float = Field(
        default=75.0, gt=0, description="seconds an idle client connection is kept open"
    )
    proxy_client_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds a request body may stall, or a client may leave its answer unread, "
        "before the request is cut off (408 if nothing was answered yet)",
    )
    proxy_upstream_timeout: float = Field(
        default=60.0,
        gt=0,
        description="seconds a guest may take to start its answer once the request is sent, "
        "or stall inside it, before the request is cut off (504 if nothing was answered yet)",
    )
    proxy_trusted_proxies: str = Field(
        default="",
        description="networks (comma-separated) of edge proxies whose X-Forwarded-* headers "
        "are believed; everyone else's are replaced",
    )
    ssh_port_min: int = Field(
        default=16000, ge=1, le=65535, description="lowest SSH gateway port given to a VM"
    )
    ssh_port_max: int = Field(
        default=26000, ge=1, le=65535, description="highest SSH gateway port given to a VM"
    )
    ssh_allowed_cidr: str = Field(
        default="0.0.0.0/0",
        description="who may connect to the SSH gateway (networks, comma-separated)",
    )
    ssh_host: str = Field(
        default="0.0.0.0", description="where the SSH gateway's per-VM ports listen"
    )
    ssh_banner_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds a client has to send its SSH identification line; "
        "until it does, nothing is woken",
    )
    ssh_wake_burst: int = Field(
        default=5, ge=1, description="wakes one source address may cause in a burst over SSH"
    )
    ssh_wakes_per_minute: float = Field(
        default=10.0, gt=0, description="sustained wakes per minute one source address may cause"
    )
    wake_max_failures: int = Field(
        default=3,
        ge=1,
        description="consecutive failed wakes after which a VM goes to error",
    )
    wake_retry_backoff: float = Field(
        default=5.0,
        gt=0,
        description="seconds before a failed wake may be tried again (doubling each time)",
    )
    wake_standbys: int = Field(
        default=8,
        ge=0,
        description="sleeping VMs (the most recently put to sleep) whose VMM is kept started, "
        "waiting for their state, so a wake skips starting it; each holds about 64 MiB. "
        "0: none",
    )
    idle_check_interval: float = Field(
        default=300.0, gt=0, description="seconds between two looks for idle VMs"
    )
    idle_timeout: float = Field(
        default=2700.0, gt=0, description="seconds without use after which a VM is snapshotted"
    )

    better_auth_url: str = Field(
        default="", description="Better Auth server that verifies API keys (empty: local keys)"
    )
    better_auth_verify_url: str = Field(
        default="", description="key verification route of that server (POST {key})"
    )
    auth_cache_ttl: float = Field(
        default=30.0, ge=0, description="seconds a key verification is cached"
    )

    s3_endpoint: str = Field(default="", description="S3-compatible server (empty: AWS)")
    s3_bucket: str = Field(
        default="", description="store snapshots in this bucket (empty: the data dir)"
    )
    s3_region: str = Field(default="us-east-1", description="the bucket's region")
    s3_access_key: str = Field(default="", description="S3 access key (empty: boto3's defaults)")
    s3_secret_key: str = Field(default="", description="S3 secret key (empty: boto3's defaults)")
    snapshot_zstd_level: int = Field(
        default=3, ge=1, le=19, description="zstd level of snapshot artifacts"
    )

    run_dir: Path = Field(
        default=Path("/run/hatchvm"),
        description="VMMs' control and console sockets (short paths; a tmpfs is best)",
    )
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "hatchvm",
        description="where downloaded .deb files are kept between image builds",
    )

    @field_validator("data_dir", "cache_dir", "run_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Resolved once, here: a relative path handed to QEMU (its memory file, its disks)
        # would depend on the directory hatchd was started in.
        return value.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _valid_database_url(cls, value: str) -> str:
        _sqlalchemy_database_url(value, Path("."))
        return value

    @field_validator("http_addr", "proxy_addr")
    @classmethod
    def _valid_addr(cls, value: str) -> str:
        _parse_addr(value)
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _valid_optional_addr(cls, value: str) -> str:
        if value:
            _parse_addr(value)
        return value

    @field_validator("better_auth_url", "better_auth_verify_url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        if value:
            try:
                _HTTP_URL.validate_python(value)
            except ValidationError as exc:
                reason = exc.errors()[0]["msg"]
                raise ValueError(f"{reason}: expected http(s)://host[:port][/path]") from None
        return value

    @model_validator(mode="after")
    def _verify_url_needs_server(self) -> Settings:
        if self.better_auth_verify_url and not self.better_auth_url:
            raise ValueError("HATCH_BETTER_AUTH_VERIFY_URL is set but HATCH_BETTER_AUTH_URL is not")
        return self

    @model_validator(mode="after")
    def _uid_range_fits(self) -> Settings:
        last = self.firecracker_uid_base + self.firecracker_uid_count - 1
        if last > _MAX_UID:
            raise ValueError(
                f"HATCH_FIRECRACKER_UID_BASE + HATCH_FIRECRACKER_UID_COUNT - 1 = {last} is "
                f"beyond the largest uid ({_MAX_UID})"
            )
        return self

    @field_validator("firecracker_chroot_base", mode="before")
    @classmethod
    def _absolute_or_none(cls, value: object) -> object:
        if value is None or value == "":
            return None
        return Path(str(value)).expanduser().resolve()

    @property
    def jail_base(self) -> Path:
        return self.firecracker_chroot_base or self.data_dir / "jailer"

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

    @field_validator("guest_dns")
    @classmethod
    def _valid_dns(cls, value: str) -> str:
        _ipv4_list(value, ipaddress.IPv4Address)
        return value

    @field_validator("egress_allow_cidrs", "egress_deny_cidrs")
    @classmethod
    def _valid_egress(cls, value: str) -> str:
        _ipv4_list(value, ipaddress.IPv4Network)  # strict: host bits set is a typo, refused
        return value

    @field_validator("ssh_allowed_cidr", "proxy_trusted_proxies")
    @classmethod
    def _valid_cidr(cls, value: str, info: ValidationInfo) -> str:
        if not _networks(value) and info.field_name == "ssh_allowed_cidr":
            raise ValueError("needs at least one network")
        return value

    @property
    def ssh_allowed_networks(self) -> list[Network]:
        return _networks(self.ssh_allowed_cidr)

    @property
    def proxy_trusted_networks(self) -> list[Network]:
        return _networks(self.proxy_trusted_proxies)

    @property
    def guest_dns_servers(self) -> list[ipaddress.IPv4Address]:
        return _ipv4_list(self.guest_dns, ipaddress.IPv4Address)

    @property
    def egress_allow_networks(self) -> list[ipaddress.IPv4Network]:
        return _ipv4_list(self.egress_allow_cidrs, ipaddress.IPv4Network)

    @property
    def egress_deny_networks(self) -> list[ipaddress.IPv4Network]:
        return _ipv4_list(self.egress_deny_cidrs, ipaddress.IPv4Network)

    @property
    def http_host_port(self) -> tuple[str, int]:
        return _parse_addr(self.http_addr)

    @property
    def proxy_host_port(self) -> tuple[str, int]:
        return _parse_addr(self.proxy_addr)

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        """The metrics listener's own address; None: /metrics is on the API's."""
        return _parse_addr(self.metrics_addr) if self.metrics_addr else None

    @property
    def bridge_interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self.bridge_cidr)

    @property
    def sqlalchemy_url(self) -> str:
        return _sqlalchemy_database_url(self.database_url, self.data_dir)

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
            message = str(err["msg"]).removeprefix("Value error, ")
            if err["loc"]:
                message = f"HATCH_{str(err['loc'][0]).upper()}: {message}"
            lines.append(message)
        raise ConfigError("; ".join(lines)) from None
