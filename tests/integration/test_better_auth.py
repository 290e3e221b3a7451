"""hatchd with a real Better Auth server (deploy/better-auth) verifying its API keys: users and
keys are made through Better Auth's own API, and hatchd asks it both ways the contract allows
(the verify route, and Better Auth's get-session with x-api-key)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.support.better_auth import BetterAuthServer, better_auth_skip_reason
from tests.support.wait import wait_for

_SKIP = better_auth_skip_reason()
pytestmark = [pytest.mark.vm, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

TTL = 2.0  # seconds hatchd caches a verification in these tests
SMALL_VM = {"mem_mib": 128, "enable_network": False}


@pytest.fixture
def better_auth():
    with BetterAuthServer() as server:
        yield server


@pytest.fixture(params=["verify-route", "get-session"])
def hatch(request, daemon_factory, better_auth):
    env = {
        "HATCH_BETTER_AUTH_URL": better_auth.base_url,
        "HATCH_AUTH_CACHE_TTL": str(TTL),
        "HATCH_MAX_VMS_PER_USER": "1",
    }
    if request.param == "verify-route":
        env["HATCH_BETTER_AUTH_VERIFY_URL"] = better_auth.verify_url
    daemon = daemon_factory(**env)
    daemon.start()
    return daemon


def call(hatch, method: str, path: str, key: str, header: str = "bearer", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}
    return httpx.request(method, hatch.url + path, headers=headers, timeout=180, **kw)


def user_with_key(better_auth, name: str) -> tuple[str, str]:
    user = better_auth.create_user(f"{name}@example.com", "correct horse battery", name)
    return user, better_auth.create_key(user)


def test_keys_are_their_owners_and_owners_are_apart(hatch, better_auth) -> None:
    assert httpx.get(hatch.url + "/healthz").json()["auth"] == "better-auth"
    _alice, alice_key = user_with_key(better_auth, "alice")
    _bob, bob_key = user_with_key(better_auth, "bob")

    for header in ("bearer", "x-api-key"):
        assert call(hatch, "GET", "/vms", alice_key, header).json() == []
        refused = call(hatch, "GET", "/vms", "x" * 64, header)
        assert (refused.status_code, refused.json()) == (401, {"error": "invalid API key"})

    created = call(hatch, "POST", "/vms", alice_key, json=SMALL_VM)
    assert created.status_code == 201, created.text
    vm = created.json()
    # Quotas count per Better Auth user: alice is at hers, bob is not.
    full = call(hatch, "POST", "/vms", alice_key, "x-api-key", json=SMALL_VM)
    assert (full.status_code, full.json()["error"]) == (403, "vm limit reached (1/1)")
    theirs = call(hatch, "POST", "/vms", bob_key, json=SMALL_VM)
    assert theirs.status_code == 201, theirs.text

    assert [v["id"] for v in call(hatch, "GET", "/vms", alice_key).json()] == [vm["id"]]
    assert [v["id"] for v in call(hatch, "GET", "/vms", bob_key).json()] == [theirs.json()["id"]]
    for method, path in (("GET", ""), ("POST", "/stop"), ("DELETE", "")):
        assert call(hatch, method, f"/vms/{vm['id']}{path}", bob_key).status_code == 404
    assert call(hatch, "GET", f"/vms/{vm['id']}", alice_key).json()["state"] == "running"

    log = hatch.log_path.read_text()
    for key in (alice_key, bob_key):
        assert key not in log and key[:12] not in log


def test_revoked_keys_stop_and_an_unreachable_server_is_503(hatch, better_auth) -> None:
    alice, key = user_with_key(better_auth, "alice")
    other = better_auth.create_key(alice)
    assert call(hatch, "GET", "/vms", key).status_code == 200
    assert call(hatch, "GET", "/vms", other).status_code == 200

    better_auth.revoke_key(alice, better_auth.key_ids[key])
    wait_for(
        lambda: call(hatch, "GET", "/vms", key).status_code == 401,
        TTL + 10,
        "the revoked key to be refused",
    )
    assert call(hatch, "GET", "/vms", other).status_code == 200  # her other key still works

    better_auth.stop()
    # Once the cached verification is older than the TTL there is no grace period: 503.
    down = wait_for(
        lambda: (r := call(hatch, "GET", "/vms", other)).status_code == 503 and r,
        TTL + 10,
        "503 while Better Auth is down",
    )
    message = down.json()["error"]
    assert better_auth.base_url in message and other[:8] not in message
    unknown = call(hatch, "GET", "/vms", "y" * 64)
    assert unknown.status_code == 503  # cannot tell: not a 401

    better_auth.start()
    assert call(hatch, "GET", "/vms", other).status_code == 200
    assert hatch.proc is not None and hatch.proc.poll() is None


def test_local_key_commands_refuse_a_better_auth_daemon(hatch) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HATCH_")}
    env.update(HATCH_DATA_DIR=str(hatch.data_dir), HATCH_API_URL=hatch.url)
    result = subprocess.run(
        [sys.executable, "-m", "hatchvm.cli.main", "keys", "create", "--user", "me"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert "Better Auth" in result.stderr and "would never be accepted" in result.stderr
