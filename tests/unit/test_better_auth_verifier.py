"""BetterAuthVerifier against scripted answers (httpx.MockTransport): what each answer of the
auth server becomes (the caller's user id, 401 or 503), and that no key leaks into an error.
The real Better Auth server is exercised in tests/integration/test_better_auth.py."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from hatchvm.auth.better_auth import BetterAuthVerifier
from hatchvm.errors import BackendUnavailable, Unauthorized

BASE = "http://auth.test:3000"
VERIFY = BASE + "/api/hatch/verify-key"
KEY = "k" * 64

Handler = Callable[[httpx.Request], httpx.Response]


def verifier(handler: Handler, verify_url: str = "", ttl: float = 30) -> BetterAuthVerifier:
    return BetterAuthVerifier(BASE, verify_url, ttl, transport=httpx.MockTransport(handler))


def session_answer(request: httpx.Request) -> httpx.Response:
    assert request.method == "GET" and request.url.path == "/api/auth/get-session"
    if request.headers.get("x-api-key") != KEY:
        return httpx.Response(401, json={"code": "INVALID_API_KEY"})
    # Better Auth's session for a key echoes the key itself as session.token.
    return httpx.Response(
        200, json={"session": {"token": KEY, "userId": "user_1"}, "user": {"id": "user_1"}}
    )


def verify_answer(request: httpx.Request) -> httpx.Response:
    assert request.method == "POST" and str(request.url) == VERIFY
    key = json.loads(request.content)["key"]
    return httpx.Response(
        200, json={"valid": True, "userId": "user_1"} if key == KEY else {"valid": False}
    )


@pytest.mark.parametrize(("handler", "verify_url"), [(session_answer, ""), (verify_answer, VERIFY)])
async def test_a_valid_key_is_its_owner_and_others_are_401(handler, verify_url) -> None:
    auth = verifier(handler, verify_url)
    assert await auth.verify(KEY) == "user_1"
    with pytest.raises(Unauthorized):
        await auth.verify("x" * 64)
    await auth.close()


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(401, json={"code": "INVALID_API_KEY"}),
        httpx.Response(403, json={"code": "KEY_DISABLED"}),
        httpx.Response(200, content=b"null"),  # no session for this key
    ],
)
async def test_better_auths_no_is_401(answer) -> None:
    auth = verifier(lambda _r: answer)
    with pytest.raises(Unauthorized):
        await auth.verify(KEY)


def raises(exc: Exception) -> Handler:
    def handler(_request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.parametrize(
    ("handler", "verify_url", "reason"),
    [
        (raises(httpx.ConnectError("refused")), "", "unreachable"),
        (raises(httpx.ReadTimeout("slow")), "", "no answer in time"),
        (lambda _r: httpx.Response(500, text="boom"), "", "HTTP 500"),
        (lambda _r: httpx.Response(429, json={"code": "RATE_LIMITED"}), VERIFY, "HTTP 429"),
        (lambda _r: httpx.Response(200, text="<html>"), "", "not JSON"),
        (lambda _r: httpx.Response(200, json={"user": {"id": 5}}), "", "user id"),
        (lambda _r: httpx.Response(200, json=["a"]), "", "session"),
        (lambda _r: httpx.Response(200, json={"valid": "yes"}), VERIFY, '"valid"'),
        (lambda _r: httpx.Response(200, json={"valid": True}), VERIFY, "user id"),
        (lambda _r: httpx.Response(302, headers={"location": "/login"}), VERIFY, "HTTP 302"),
    ],
)
async def test_an_auth_server_that_cannot_answer_is_503_naming_it(
    handler, verify_url, reason
) -> None:
    auth = verifier(handler, verify_url)
    with pytest.raises(BackendUnavailable) as err:
        await auth.verify(KEY)
    assert reason in err.value.message
    assert auth.server in err.value.message  # names the auth server...
    assert KEY[:8] not in err.value.message  # ...never the key


async def test_failures_are_asked_again_and_answers_are_cached() -> None:
    calls: list[str] = []
    up = True

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if not up:
            raise httpx.ConnectError("refused")
        return session_answer(request)

    auth = verifier(handler)
    assert await auth.verify(KEY) == "user_1"
    assert await auth.verify(KEY) == "user_1"
    assert len(calls) == 1
    up = False
    fresh = verifier(handler)
    for _ in range(2):
        with pytest.raises(BackendUnavailable):
            await fresh.verify(KEY)
    assert len(calls) == 3
