"""Settings: defaults that work, malformed values named by their variable."""

import pytest

from hatchvm.config import ConfigError, load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.http_host_port == ("0.0.0.0", 8080)
    assert s.proxy_host_port == ("0.0.0.0", 9090)
    assert s.bridge_name == "hatchbr0" and str(s.bridge_interface) == "172.16.0.1/24"
    assert s.sqlalchemy_url.startswith("sqlite+aiosqlite:///") and s.sqlalchemy_url.endswith(
        "data/hatchvm.db"
    )
    assert s.max_vms_per_user == 5 and s.max_snapshots_per_vm == 10
    assert [str(a) for a in s.guest_dns_servers] == ["1.1.1.1"]
    assert s.egress_allow_networks == [] and s.egress_deny_networks == []


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("HATCH_HTTP_ADDR", "localhost"),
        ("HATCH_HTTP_ADDR", ":99999"),
        ("HATCH_BRIDGE_CIDR", "172.16.0.0/24"),
        ("HATCH_BRIDGE_CIDR", "nonsense"),
        ("HATCH_QEMU_ACCEL", "fast"),
        ("HATCH_MAX_VMS_PER_USER", "many"),
        ("HATCH_BRIDGE_NAME", "a-name-that-is-too-long"),
        ("HATCH_EGRESS_ALLOW_CIDRS", "10.0.0.0/8,mirror"),
        ("HATCH_EGRESS_DENY_CIDRS", "10.0.0.1/8"),  # host bits: which network was meant?
        ("HATCH_EGRESS_DENY_CIDRS", "fd00::/8"),  # guests have no IPv6
        ("HATCH_GUEST_DNS", "1.1.1.1 8.8.8.8"),
        ("HATCH_CGROUP_PARENT", "../escape"),
        ("HATCH_CGROUP_PARENT", "/absolute"),
        ("HATCH_CGROUPS", "maybe"),
        ("HATCH_MAX_MEM_MIB_PER_USER", "-1"),
        ("HATCH_QEMU_TB_SIZE_MIB", "0"),
    ],
)
def test_malformed_value_names_variable(monkeypatch: pytest.MonkeyPatch, var, value) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value).startswith(var + ":")


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgresql://u:p@localhost/hatch", "postgresql+asyncpg://u:p@localhost/hatch"),
        ("postgres://u:p%40ss@db:5433/hatch", "postgresql+asyncpg://u:p%40ss@db:5433/hatch"),
        ("postgresql+asyncpg://u@db/hatch", "postgresql+asyncpg://u@db/hatch"),
        # A Unix socket: no host before the path, its directory in ?host=.
        (
            "postgresql://u@/hatch?host=/var/run/postgresql",
            "postgresql+asyncpg://u@/hatch?host=%2Fvar%2Frun%2Fpostgresql",
        ),
        ("postgresql:///hatch", "postgresql+asyncpg:///hatch"),
        # libpq's sslmode is asyncpg's ssl: it was handed to asyncpg as is, a TypeError there.
        ("postgresql://u@db/hatch?sslmode=require", "postgresql+asyncpg://u@db/hatch?ssl=require"),
        ("sqlite:////var/lib/hatch/h.db", "sqlite+aiosqlite:////var/lib/hatch/h.db"),
    ],
)
def test_database_urls(monkeypatch: pytest.MonkeyPatch, given: str, used: str) -> None:
    monkeypatch.setenv("HATCH_DATABASE_URL", given)
    assert load_settings().sqlalchemy_url == used


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("mysql://u@db/hatch", "unsupported database 'mysql'"),
        ("postgresql+psycopg://u@db/hatch", "unsupported database 'postgresql+psycopg'"),
        ("postgresql://u@db/hatch?application_name=x", "unsupported parameter 'application_name'"),
        ("postgresql://u@db/hatch?ssl=require&sslmode=disable", "ssl or sslmode, not both"),
        ("sqlite://", "SQLite needs a file"),
        ("db.example.com", "not a URL"),
    ],
)
def test_unusable_database_urls_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, given: str, message: str
) -> None:
    monkeypatch.setenv("HATCH_DATABASE_URL", given)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value).startswith("HATCH_DATABASE_URL: ") and message in str(err.value)


def test_egress_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HATCH_EGRESS_ALLOW_CIDRS", " 10.1.0.0/16, 192.168.5.7/32,")
    monkeypatch.setenv("HATCH_EGRESS_DENY_CIDRS", "203.0.113.0/24")
    monkeypatch.setenv("HATCH_GUEST_DNS", "10.0.0.53,1.1.1.1")
    s = load_settings()
    assert [str(n) for n in s.egress_allow_networks] == ["10.1.0.0/16", "192.168.5.7/32"]
    assert [str(n) for n in s.egress_deny_networks] == ["203.0.113.0/24"]
    assert [str(a) for a in s.guest_dns_servers] == ["10.0.0.53", "1.1.1.1"]


def test_malformed_egress_names_the_bad_part(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HATCH_EGRESS_DENY_CIDRS", "203.0.113.0/24,10.0.0.1/8")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "'10.0.0.1/8'" in str(err.value) and "host bits" in str(err.value)


def test_the_jailers_uid_range_must_end_within_the_uids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HATCH_FIRECRACKER_UID_BASE", "4294967000")
    monkeypatch.setenv("HATCH_FIRECRACKER_UID_COUNT", "1000")
    with pytest.raises(ConfigError, match="HATCH_FIRECRACKER_UID_BASE \\+ HATCH_FIRECRACKER_UID"):
        load_settings()
    monkeypatch.setenv("HATCH_FIRECRACKER_UID_BASE", "0")
    with pytest.raises(ConfigError, match=r"^HATCH_FIRECRACKER_UID_BASE:"):
        load_settings()


def test_the_jails_default_to_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HATCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HATCH_FIRECRACKER_CHROOT_BASE", "")
    assert load_settings().jail_base == tmp_path / "jailer"
    monkeypatch.setenv("HATCH_FIRECRACKER_CHROOT_BASE", str(tmp_path / "j"))
    assert load_settings().jail_base == tmp_path / "j"
