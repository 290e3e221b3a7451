"""GET /metrics on a real hatchd with a real guest, served on the API's address or on one of its
own (HATCH_METRICS_ADDR): snapshots, a wake through the proxy and a restore from the store move
the figures they should, and nothing in a scrape names a VM, a key or a secret."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import HatchDaemon, free_port
from tests.support.wait import wait_http

pytestmark = pytest.mark.vm

WEB_SERVER = """#!/bin/sh
mkdir -p /srv/www
echo "hello from $(hostname)" > /srv/www/index.html
busybox httpd -p 8080 -h /srv/www
"""
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
# In hatchd's settings and environment (unused: no bucket), so a scrape that dumped either
# would show them.
S3_ACCESS_KEY = "AKIAMETRICSNEVERSHOWN"
S3_SECRET_KEY = "metrics-secret-never-shown-6f1d2c"
WAKE = "hatch_wake_duration_seconds"
MIB = 1 << 20


class Scraped:
    """One scrape without an API key, parsed by prometheus_client's own parser."""

    def __init__(self, url: str) -> None:
        response = httpx.get(url, timeout=30)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == TEXT_FORMAT
        self.text = response.text
        self.types: dict[str, str] = {}
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(response.text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.values[(s.name, frozenset(s.labels.items()))] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)


def via_proxy(hatch: HatchDaemon, subdomain: str) -> httpx.Response:
    return httpx.get(
        f"http://127.0.0.1:{hatch.proxy_port}/",
        headers={"Host": f"{subdomain}.hatch.local"},
        timeout=120,
    )


@pytest.mark.parametrize("where", ["api", "own_address"])
def test_snapshots_a_wake_and_a_restore_move_the_figures(daemon_factory, where: str) -> None:
    env = {"HATCH_S3_ACCESS_KEY": S3_ACCESS_KEY, "HATCH_S3_SECRET_KEY": S3_SECRET_KEY}
    if where == "own_address":
        metrics_port = free_port()
        env["HATCH_METRICS_ADDR"] = f"127.0.0.1:{metrics_port}"
    hatch = daemon_factory(**env)
    hatch.start()
    if where == "own_address":
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        on_api = httpx.get(hatch.url + "/metrics", timeout=30)
        assert on_api.status_code == 404
        assert "HATCH_METRICS_ADDR" in on_api.json()["error"]
        # The listener serves /metrics alone: not the API, not even with no key needed.
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=30).status_code == 404
    else:
        url = hatch.url + "/metrics"

    before = Scraped(url)
    assert before.types[WAKE] == "histogram"
    assert before.types["hatch_vms"] == "gauge"
    assert before.types["hatch_snapshot_bytes_deduplicated"] == "counter"
    assert before("hatch_vms", state="running") == 0
    proxy_wake = {"stage": "wake", "how": "restore", "trigger": "proxy"}
    assert before(f"{WAKE}_count", **proxy_wake) == 0  # present from the start, at 0
    assert (f"{WAKE}_count", frozenset(proxy_wake.items())) in before.values

    key = hatch.create_key("alice")
    with hatch.client(key) as api:
        vm = api.create_vm(user_data=WEB_SERVER, mem_mib=256)
        wait_http(f"http://{vm['guest_ip']}:8080/")
        assert Scraped(url)("hatch_vms", state="running") == 1
        api.create_route(vm["id"], target_port=8080, subdomain="metered")
        first = api.snapshot_vm(vm["id"])
        manual = {"automatic": "false"}
        # The call returns once captured: the capture is counted, the store (in the
        # background) once it has ended.
        captured = Scraped(url)
        assert captured("hatch_snapshot_capture_duration_seconds_count", **manual) == 1
        assert captured("hatch_snapshot_capture_duration_seconds_sum", **manual) > 0
        first = api.wait_stored(first["id"])
        assert first["status"] == "stored"
        asleep = Scraped(url)
        assert asleep("hatch_vms", state="snapshotted") == 1
        assert asleep("hatch_vms", state="running") == 0
        assert asleep("hatch_snapshot_store_duration_seconds_count", **manual) == 1
        assert asleep("hatch_snapshot_store_duration_seconds_sum", **manual) > 0
        assert asleep("hatch_snapshot_stored_bytes_total", **manual) == first["size_bytes"] > 0

        woken = via_proxy(hatch, "metered")  # wakes the VM from its snapshot
        assert woken.status_code == 200, woken.text
        assert woken.text.startswith("hello from")
        awake = Scraped(url)
        for stage in ("wake", "port_wait", "proxy"):
            labels = {"stage": stage, "how": "restore", "trigger": "proxy"}
            assert awake(f"{WAKE}_count", **labels) == 1, stage
            assert awake(f"{WAKE}_sum", **labels) > 0, stage
            assert awake(f"{WAKE}_bucket", **labels, le="+Inf") == 1, stage
        assert awake(f"{WAKE}_count", stage="wake", how="restore", trigger="api") == 0
        assert awake("hatch_restore_duration_seconds_count", source="hot") == 1
        assert awake("hatch_vms", state="running") == 1
        syncs = awake("hatch_agent_syncs_total", result="ok")
        assert syncs + awake("hatch_agent_syncs_total", result="failed") == 1
        ok = {"status_class": "2xx", "origin": "guest"}
        assert awake("hatch_proxy_request_duration_seconds_count", **ok) == 1
        assert awake("hatch_proxy_request_duration_seconds_sum", **ok) > 0

        assert api.snapshot_vm(vm["id"], wait_stored=True)["status"] == "stored"
        api.restore_vm(vm["id"], first["id"])  # not what its files hold: from the store
        restored = Scraped(url)
        assert restored("hatch_restore_duration_seconds_count", source="store") == 1
        assert restored("hatch_restore_duration_seconds_count", source="hot") == 1
        assert restored("hatch_snapshot_capture_duration_seconds_count", **manual) == 2
        assert restored("hatch_snapshot_stored_bytes_total", **manual) > first["size_bytes"]
        assert restored("hatch_snapshot_failures_total", step="restore") == 0
        assert restored(f"{WAKE}_count", **proxy_wake) == 1  # the API's restore is no wake
        # The guest barely ran between its two snapshots: most of its memory (its kernel alone
        # is tens of MiB) was stored by the first, and the second did not store it again.
        shared = "hatch_snapshot_bytes_deduplicated_total"
        assert restored(shared) - awake(shared) >= 16 * MIB

    assert via_proxy(hatch, "nobody").status_code == 404
    after = Scraped(url)
    assert after("hatch_proxy_request_duration_seconds_count", **ok) == 1
    mine = {"status_class": "4xx", "origin": "proxy"}
    assert after("hatch_proxy_request_duration_seconds_count", **mine) == 1
    labels = {name for _, series in after.values for name, _ in series}
    assert not {"vm_id", "vm", "user", "user_id", "subdomain", "host", "key"} & labels
    for secret in (vm["id"], first["id"], key, key[:10], S3_ACCESS_KEY, S3_SECRET_KEY, "alice"):
        assert secret not in after.text, secret

    # SIGTERM: the metrics listener ends with the API's server, nothing hangs (stop() would
    # escalate to SIGKILL), hatchd shuts down in order and nothing fails on the way out.
    hatch.stop()
    assert hatch.proc is not None
    assert hatch.proc.returncode == 0, hatch.log_tail()
    assert "hatchd shutting down" in hatch.log_path.read_text(), hatch.log_tail()
    assert "Traceback" not in hatch.log_path.read_text(), hatch.log_tail()
