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


def test_postgres_url_uses_asyncpg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HATCH_DATABASE_URL", "postgresql://u:p@localhost/hatch")
    assert load_settings().sqlalchemy_url == "postgresql+asyncpg://u:p@localhost/hatch"
