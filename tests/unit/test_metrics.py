"""The metrics module: what the exposition says before and after events, the proxy's lock-free
request histogram, VM states counted at scrape time, and the /metrics route on the API's app
or on its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hatchvm.api.app import create_app
from hatchvm.api.metrics import metrics_app
from hatchvm.config import ConfigError, load_settings
from hatchvm.db.engine import make_engine, make_sessionmaker
from hatchvm.db.migrate import upgrade
from hatchvm.db.models import VM, Image
from hatchvm.metrics import Metrics
from hatchvm.metrics.requests import RequestStats
from hatchvm.metrics.scrape import Scrape

Labels = dict[str, str]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by name and labels (parsed by prometheus_client)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_every_figure_is_exposed_with_its_type() -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(exposition(Metrics()))}
    assert {
        "hatch_wake_duration_seconds": "histogram",
        "hatch_wake_failures": "counter",
        "hatch_snapshot_capture_duration_seconds": "histogram",
        "hatch_snapshot_store_duration_seconds": "histogram",
        "hatch_snapshot_stored_bytes": "counter",
        "hatch_snapshot_bytes_deduplicated": "counter",
        "hatch_restore_duration_seconds": "histogram",
        "hatch_snapshot_failures": "counter",
        "hatch_vms": "gauge",
        "hatch_wake_standbys": "gauge",
        "hatch_create_duration_seconds": "histogram",
        "hatch_proxy_request_duration_seconds": "histogram",
        "hatch_proxy_refusals": "counter",
        "hatch_proxy_timeouts": "counter",
        "hatch_agent_syncs": "counter",
        "hatch_vm_deaths": "counter",
        "hatch_ssh_connections": "counter",
        "hatch_ssh_refusals": "counter",
    }.items() <= families.items()
    assert "process_open_fds" in families or "process_cpu_seconds" in families


def test_known_series_start_at_zero() -> None:
    text = exposition(Metrics())
    wake = "hatch_wake_duration_seconds_count"
    assert value(text, wake, stage="wake", how="restore", trigger="proxy") == 0
    assert value(text, wake, stage="proxy", how="cold_boot", trigger="proxy") == 0
    assert value(text, wake, stage="port_wait", how="restore", trigger="ssh") == 0
    assert value(text, wake, stage="wake", how="cold_boot", trigger="api") == 0
    assert value(text, wake, stage="proxy", how="restore", trigger="ssh") is None  # not measured
    assert value(text, "hatch_snapshot_bytes_deduplicated_total") == 0
    assert value(text, "hatch_snapshot_stored_bytes_total", automatic="true") == 0
    assert value(text, "hatch_restore_duration_seconds_count", source="store") == 0
    assert value(text, "hatch_vm_deaths_total", reason="guest-panic") == 0
    assert value(text, "hatch_create_duration_seconds_count", how="template") == 0
    assert value(text, "hatch_ssh_refusals_total", reason="wake_rate_limited") == 0
    assert value(text, "hatch_proxy_refusals_total", status="429") == 0
    assert value(text, "hatch_agent_syncs_total", result="failed") == 0


def test_events_move_their_series() -> None:
    metrics = Metrics()
    metrics.wake_stage("wake", "restore", "proxy", 0.3)
    metrics.wake_stage("port_wait", "restore", "proxy", 0.02)
    metrics.wake_failed("ssh")
    metrics.snapshot_captured(True, 0.05)
    metrics.snapshot_stored(True, 1.5, 4096)
    metrics.snapshot_captured(False, 0.07)
    metrics.snapshot_stored(False, 2.5, 1000)
    metrics.deduplicated(8192)
    metrics.restored(True, 0.2)
    metrics.snapshot_failed("store")
    metrics.vm_created("template", 0.4)
    metrics.vm_created("cold_boot", 3.1)
    metrics.vm_died(None)
    metrics.vm_died("guest-panic")
    metrics.vm_died("something-qemu-added")
    metrics.agent_synced(True)
    metrics.proxy_refused(503)
    metrics.proxy_timed_out("head")
    metrics.ssh_connected()
    metrics.ssh_refused("no_identification")
    text = exposition(metrics)

    wake = {"stage": "wake", "how": "restore", "trigger": "proxy"}
    assert value(text, "hatch_wake_duration_seconds_count", **wake) == 1
    assert value(text, "hatch_wake_duration_seconds_sum", **wake) == pytest.approx(0.3)
    assert value(text, "hatch_wake_duration_seconds_bucket", **wake, le="0.25") == 0
    assert value(text, "hatch_wake_duration_seconds_bucket", **wake, le="0.5") == 1
    assert value(text, "hatch_wake_failures_total", trigger="ssh") == 1
    assert value(text, "hatch_snapshot_capture_duration_seconds_count", automatic="true") == 1
    assert value(text, "hatch_snapshot_store_duration_seconds_sum", automatic="false") == 2.5
    assert value(text, "hatch_snapshot_stored_bytes_total", automatic="true") == 4096
    assert value(text, "hatch_snapshot_bytes_deduplicated_total") == 8192
    assert value(text, "hatch_restore_duration_seconds_count", source="hot") == 1
    assert value(text, "hatch_snapshot_failures_total", step="store") == 1
    assert value(text, "hatch_create_duration_seconds_sum", how="template") == 0.4
    assert value(text, "hatch_create_duration_seconds_bucket", how="cold_boot", le="2.5") == 0
    assert value(text, "hatch_create_duration_seconds_bucket", how="cold_boot", le="5.0") == 1
    assert value(text, "hatch_vm_deaths_total", reason="unknown") == 1
    assert value(text, "hatch_vm_deaths_total", reason="guest-panic") == 1
    assert value(text, "hatch_vm_deaths_total", reason="other") == 1  # the label set is fixed
    assert value(text, "hatch_agent_syncs_total", result="ok") == 1
    assert value(text, "hatch_proxy_refusals_total", status="503") == 1
    assert value(text, "hatch_proxy_timeouts_total", phase="head") == 1
    assert value(text, "hatch_ssh_connections_total") == 1
    assert value(text, "hatch_ssh_refusals_total", reason="no_identification") == 1


def test_vm_states_cover_every_state_and_vanish_when_unknown() -> None:
    metrics = Metrics()
    metrics.set_vm_states({"running": 2, "snapshotted": 1})
    text = exposition(metrics)
    assert value(text, "hatch_vms", state="running") == 2
    assert value(text, "hatch_vms", state="snapshotted") == 1
    assert value(text, "hatch_vms", state="error") == 0
    assert value(text, "hatch_vms", state="restoring") == 0
    metrics.set_vm_states(None)  # the database did not answer: no stale figure
    assert value(exposition(metrics), "hatch_vms", state="running") is None


# ---- the proxy's request histogram -------------------------------------------------------


def test_request_stats_bucket_like_prometheus() -> None:
    stats = RequestStats([0.001, 0.01, 0.1])
    stats.observe(200, False, 0.001)  # on a bound: in that bucket (le)
    stats.observe(200, False, 0.05)
    stats.observe(204, False, 5.0)  # past every bound: +Inf only
    stats.observe(502, True, 0.002)
    stats.observe(0, True, 0.5)  # the client left before any answer
    stats.observe(999, False, 0.0)  # a guest may send any three-digit status
    found = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in stats.collect()
        for s in family.samples
    }

    def get(name: str, **labels: str) -> float | None:
        return found.get((name, frozenset(labels.items())))

    ok = {"status_class": "2xx", "origin": "guest"}
    base = "hatch_proxy_request_duration_seconds"
    assert get(f"{base}_bucket", **ok, le="0.001") == 1
    assert get(f"{base}_bucket", **ok, le="0.01") == 1
    assert get(f"{base}_bucket", **ok, le="0.1") == 2
    assert get(f"{base}_bucket", **ok, le="+Inf") == 3
    assert get(f"{base}_count", **ok) == 3
    assert get(f"{base}_sum", **ok) == pytest.approx(5.051)
    assert get(f"{base}_count", status_class="5xx", origin="proxy") == 1
    assert get(f"{base}_count", status_class="none", origin="proxy") == 1
    assert get(f"{base}_count", status_class="9xx", origin="guest") == 1
    assert get(f"{base}_count", status_class="4xx", origin="guest") is None  # none seen yet


def test_request_stats_are_part_of_the_exposition() -> None:
    metrics = Metrics()
    metrics.requests.observe(404, True, 0.0003)
    text = exposition(metrics)
    labels = {"status_class": "4xx", "origin": "proxy"}
    assert value(text, "hatch_proxy_request_duration_seconds_count", **labels) == 1
    assert value(text, "hatch_proxy_request_duration_seconds_bucket", **labels, le="0.0005") == 1


# ---- scraping ------------------------------------------------------------------------------


@pytest.fixture
async def scrape(tmp_path: Path) -> AsyncIterator[Scrape]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'hatchvm.db'}")
    await upgrade(engine)
    sessions = make_sessionmaker(engine)
    async with sessions() as session, session.begin():
        session.add(Image(id="img_x", kernel_path="-", rootfs_path="-"))
        for n, state in enumerate(("running", "running", "snapshotted", "stopped")):
            session.add(
                VM(
                    id=f"vm_{n}",
                    user_id="alice",
                    image_id="img_x",
                    state=state,
                    vcpu_count=1,
                    mem_mib=128,
                    enable_network=False,
                )
            )
    yield Scrape(Metrics(), sessions)
    await engine.dispose()


async def test_a_scrape_counts_vms_by_state_in_the_database(scrape: Scrape) -> None:
    text = (await scrape.render()).decode()
    assert value(text, "hatch_vms", state="running") == 2
    assert value(text, "hatch_vms", state="snapshotted") == 1
    assert value(text, "hatch_vms", state="stopped") == 1
    assert value(text, "hatch_vms", state="starting") == 0
    assert not [k for k in samples(text) if "vm_0" in str(k)], "no label names a VM"


def client(app: FastAPI) -> httpx.AsyncClient:
    """The app on this test's loop (the scrape's database connections live on it)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hatchd")


async def test_the_api_serves_metrics_without_a_key_in_text_format(scrape: Scrape) -> None:
    async with client(create_app(None, scrape)) as api:  # type: ignore[arg-type]
        r = await api.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert value(r.text, "hatch_vms", state="running") == 2


async def test_metrics_served_elsewhere_are_404_on_the_api() -> None:
    async with client(create_app(None)) as api:  # type: ignore[arg-type]
        r = await api.get("/metrics")
    assert r.status_code == 404
    assert "HATCH_METRICS_ADDR" in r.json()["error"]


async def test_the_metrics_listener_serves_metrics_only(scrape: Scrape) -> None:
    async with client(metrics_app(scrape)) as listener:
        r = await listener.get("/metrics")
        assert r.status_code == 200 and "hatch_vms" in r.text
        assert (await listener.get("/vms")).status_code == 404
        assert (await listener.get("/openapi.json")).status_code == 404


def test_the_metrics_address_setting() -> None:
    assert load_settings().metrics_host_port is None  # on the API's port by default
    assert load_settings(metrics_addr="127.0.0.1:9100").metrics_host_port == ("127.0.0.1", 9100)
    assert load_settings(metrics_addr=":9100").metrics_host_port == ("0.0.0.0", 9100)
    with pytest.raises(ConfigError, match="HATCH_METRICS_ADDR"):
        load_settings(metrics_addr="9100")
