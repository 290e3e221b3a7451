"""The companion Better Auth server (deploy/better-auth), run for real on loopback: users and
keys made through its HTTP API, keys verified the two ways hatchd can ask."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import httpx
import pytest

from tests.support.better_auth import BetterAuthServer, better_auth_skip_reason

_reason = better_auth_skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

PASSWORD = "correct horse battery staple"
_n = itertools.count(1)


@pytest.fixture(scope="module")
def ba() -> Iterator[BetterAuthServer]:
    with BetterAuthServer() as server:
        yield server


def new_user(ba: BetterAuthServer) -> str:
    n = next(_n)
    return ba.create_user(f"user{n}@example.com", PASSWORD, f"User {n}")


def session_user_id(response: httpx.Response) -> str | None:
    """The user id get-session answers for an API key, None when it gives no session."""
    if response.status_code in (401, 403):  # how Better Auth refuses a key it does not accept
        return None
    assert response.status_code == 200, response.text
    body = response.json()
    if body is None:
        return None
    assert body["session"]["userId"] == body["user"]["id"]
    return str(body["user"]["id"])


def test_sign_up_and_sign_in_give_the_same_user(ba: BetterAuthServer) -> None:
    user = ba.create_user("alice@example.com", PASSWORD, "Alice")
    assert user
    assert ba.sign_in("alice@example.com", PASSWORD) == user
    again = ba.http.post(
        "/api/auth/sign-up/email",
        json={"email": "alice@example.com", "password": PASSWORD, "name": "Alice"},
    )
    assert again.status_code == 422


def test_a_key_verifies_both_ways_with_its_owner(ba: BetterAuthServer) -> None:
    alice, bob = new_user(ba), new_user(ba)
    key_a, key_b = ba.create_key(alice), ba.create_key(bob, name="bob's")
    assert ba.verify(key_a) == {"valid": True, "userId": alice}
    assert ba.verify(key_b) == {"valid": True, "userId": bob}

    response = ba.get_session(key_a)
    assert session_user_id(response) == alice
    session = response.json()["session"]
    assert session["id"] == ba.key_ids[key_a]  # the "session" is the key itself
    assert session_user_id(ba.get_session(key_b)) == bob


def test_a_wrong_key_does_not_verify(ba: BetterAuthServer) -> None:
    key = ba.create_key(new_user(ba))
    wrong = key[:-1] + ("a" if key[-1] != "a" else "b")
    for bad in (wrong, "x" * 64, "short", ""):
        assert ba.verify(bad) == {"valid": False}
        assert session_user_id(ba.get_session(bad)) is None
    # Precisely: a key of the right length is 401 INVALID_API_KEY, a shorter one 403.
    assert ba.get_session(wrong).status_code == 401
    assert ba.get_session("short").status_code == 403
    # Without any key or cookie get-session is 200 with a null body.
    no_key = ba.http.get("/api/auth/get-session")
    assert (no_key.status_code, no_key.json()) == (200, None)


def test_the_verify_route_wants_a_string_key(ba: BetterAuthServer) -> None:
    for body in (b"", b"not json", b"[]", b'{"key": 5}', b'{"token": "abc"}'):
        response = ba.http.post("/api/hatch/verify-key", content=body)
        assert response.status_code == 400, body
        assert set(response.json()) == {"error"}
    assert ba.http.get("/api/hatch/verify-key").status_code == 405


def test_a_deleted_key_no_longer_verifies(ba: BetterAuthServer) -> None:
    user = new_user(ba)
    key, other = ba.create_key(user), ba.create_key(user)
    assert ba.verify(key)["valid"] is True
    ba.revoke_key(user, ba.key_ids[key])
    assert ba.verify(key) == {"valid": False}
    assert session_user_id(ba.get_session(key)) is None
    assert ba.verify(other) == {"valid": True, "userId": user}


def test_a_disabled_key_no_longer_verifies_until_enabled(ba: BetterAuthServer) -> None:
    user = new_user(ba)
    key = ba.create_key(user)
    ba.set_key_enabled(user, ba.key_ids[key], False)
    assert ba.verify(key) == {"valid": False}
    response = ba.get_session(key)
    assert (response.status_code, response.json()["code"]) == (401, "KEY_DISABLED")
    ba.set_key_enabled(user, ba.key_ids[key], True)
    assert ba.verify(key) == {"valid": True, "userId": user}


def test_a_user_cannot_delete_another_users_key(ba: BetterAuthServer) -> None:
    alice, mallory = new_user(ba), new_user(ba)
    key = ba.create_key(alice)
    with pytest.raises(AssertionError, match="404"):
        ba.revoke_key(mallory, ba.key_ids[key])
    assert ba.verify(key)["valid"] is True


def test_a_busy_key_is_not_rate_limited(ba: BetterAuthServer) -> None:
    user = new_user(ba)
    key = ba.create_key(user)
    for _ in range(50):
        assert ba.verify(key) == {"valid": True, "userId": user}
    for _ in range(50):
        assert session_user_id(ba.get_session(key)) == user


def test_no_key_is_ever_logged(ba: BetterAuthServer) -> None:
    log = ba.log()
    assert "listening on" in log
    assert ba.key_ids
    for key in ba.key_ids:
        assert key not in log


def test_production_mode_limits_sign_in_but_not_key_checks() -> None:
    # NODE_ENV=production turns Better Auth's per-IP limiter on (100 requests per 10 s, 3 for
    # sign-in/sign-up). get-session is exempt, so hatchd's checks from one address keep working.
    with BetterAuthServer(NODE_ENV="production") as ba:
        user = ba.create_user("prod@example.com", PASSWORD, "Prod")
        key = ba.create_key(user)
        for _ in range(150):
            assert session_user_id(ba.get_session(key)) == user
        for _ in range(50):
            assert ba.verify(key) == {"valid": True, "userId": user}
        codes = [
            ba.http.post(
                "/api/auth/sign-in/email", json={"email": "prod@example.com", "password": "nope!"}
            ).status_code
            for _ in range(4)
        ]
        assert codes[-1] == 429, codes


def test_restart_on_the_same_database_keeps_users_and_keys() -> None:
    with BetterAuthServer() as ba:
        user = ba.create_user("keep@example.com", PASSWORD, "Keep")
        key = ba.create_key(user)
        assert ba.stop() == 0  # SIGTERM: a clean exit
        ba.start()  # the schema is there: the migration has nothing to do
        assert ba.verify(key) == {"valid": True, "userId": user}
        second = ba.create_key(user)  # the old session cookie still works: same secret
        assert ba.verify(second)["valid"] is True
        assert ba.sign_in("keep@example.com", PASSWORD) == user
        assert "schema migrated" in ba.log()
        assert ba.log().count("schema migrated") == 1
        assert key not in ba.log()
