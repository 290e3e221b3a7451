"""The companion Better Auth server (deploy/better-auth) as a test fixture: a real node process
on 127.0.0.1 with a free port and a throw-away SQLite database. Users and API keys are made
through Better Auth's own HTTP API, never by writing its database."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

APP_DIR = Path(__file__).resolve().parents[2] / "deploy" / "better-auth"
VERIFY_PATH = "/api/hatch/verify-key"
START_TIMEOUT = 30.0

# What a working install leaves in node_modules: the two packages and the native module
# better-sqlite3 compiles at install time.
_REQUIRED = (
    "better-auth/package.json",
    "@better-auth/api-key/package.json",
    "better-sqlite3/build/Release/better_sqlite3.node",
)


def better_auth_skip_reason(app_dir: Path = APP_DIR) -> str | None:
    """Why the Better Auth server cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed (Better Auth server tests need Node.js 20+)"
    missing = [p for p in _REQUIRED if not (app_dir / "node_modules" / p).exists()]
    if missing:
        return f"{app_dir}/node_modules is incomplete ({missing[0]} missing): run scripts/install"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BetterAuthError(AssertionError):
    pass


class BetterAuthServer:
    """One Better Auth server. `with BetterAuthServer() as ba:` starts it and stops it.

    Users are referred to by the id create_user returns; the helper keeps each user's session
    cookie (from sign-up or sign-in) to act as that user."""

    def __init__(self, app_dir: Path = APP_DIR, **env: str) -> None:
        self.app_dir = app_dir
        self.port = _free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="better-auth-"))
        self.db_path = self.tmp / "better-auth.db"
        self.log_path = self.tmp / "server.log"
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.verify_url = f"{self.base_url}{VERIFY_PATH}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BETTER_AUTH_")},
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "DATABASE_PATH": str(self.db_path),
            "BETTER_AUTH_URL": self.base_url,
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.base_url, timeout=10.0)
        self.sessions: dict[str, str] = {}  # user id -> Cookie header value
        self.key_ids: dict[str, str] = {}  # key made here -> its id
        self.startup_seconds: float | None = None

    # --- process -------------------------------------------------------------------------

    def start(self) -> BetterAuthServer:
        reason = better_auth_skip_reason(self.app_dir)
        if reason:
            raise BetterAuthError(reason)
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["node", "server.mjs"],
                cwd=self.app_dir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = started + START_TIMEOUT
        last: Exception | None = None
        while True:
            if self.proc.poll() is not None:
                raise BetterAuthError(
                    f"Better Auth server exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                if self.http.get("/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError as exc:
                last = exc
            if time.monotonic() > deadline:
                self.stop()
                raise BetterAuthError(
                    f"Better Auth server not up after {START_TIMEOUT}s ({last}):\n{self.log()}"
                )
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not gone in 10 s. Returns the exit status."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
            self.proc = None
        return code

    def restart(self) -> BetterAuthServer:
        """Stop and start again on the same port, database and secret."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        self.http.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> BetterAuthServer:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- Better Auth's API ---------------------------------------------------------------

    def _json(self, response: httpx.Response, what: str) -> Any:
        if response.status_code != 200:
            raise BetterAuthError(f"{what}: HTTP {response.status_code} {response.text}")
        return response.json()

    def _keep_session(self, response: httpx.Response, user_id: str) -> None:
        # The session cookie is "better-auth.session_token" ("__Secure-" in front on https).
        # It is sent explicitly per user, so the client's own jar must not keep it.
        self.http.cookies.clear()
        for name, value in response.cookies.items():
            if name.endswith("better-auth.session_token"):
                self.sessions[user_id] = f"{name}={value}"
                return
        raise BetterAuthError(f"no session cookie in {response.headers.get_list('set-cookie')}")

    def _as_user(self, user: str) -> dict[str, str]:
        # A cookie-bearing POST must carry an Origin Better Auth trusts (its own base URL),
        # else it answers 403 MISSING_OR_NULL_ORIGIN.
        return {"cookie": self.sessions[user], "origin": self.base_url}

    def create_user(self, email: str, password: str, name: str) -> str:
        """POST /api/auth/sign-up/email; returns the new user's id. Sign-up also signs in."""
        response = self.http.post(
            "/api/auth/sign-up/email", json={"email": email, "password": password, "name": name}
        )
        user_id = self._json(response, "sign-up")["user"]["id"]
        self._keep_session(response, user_id)
        return str(user_id)

    def sign_in(self, email: str, password: str) -> str:
        """POST /api/auth/sign-in/email; returns the user's id and keeps the new session."""
        response = self.http.post(
            "/api/auth/sign-in/email", json={"email": email, "password": password}
        )
        user_id = str(self._json(response, "sign-in")["user"]["id"])
        self._keep_session(response, user_id)
        return user_id

    def create_key_record(self, user: str, name: str | None = None) -> dict[str, Any]:
        """POST /api/auth/api-key/create as the user; the whole answer (key, id, ...)."""
        body = {"name": name} if name else {}
        record = self._json(
            self.http.post("/api/auth/api-key/create", json=body, headers=self._as_user(user)),
            "create key",
        )
        self.key_ids[record["key"]] = record["id"]
        return dict(record)

    def create_key(self, user: str, name: str | None = None) -> str:
        """A new API key of the user: the secret string (its id is in key_ids)."""
        return str(self.create_key_record(user, name)["key"])

    def revoke_key(self, user: str, key_id: str) -> None:
        """POST /api/auth/api-key/delete as the user: the key is gone for good."""
        answer = self._json(
            self.http.post(
                "/api/auth/api-key/delete", json={"keyId": key_id}, headers=self._as_user(user)
            ),
            "delete key",
        )
        if answer != {"success": True}:
            raise BetterAuthError(f"delete key: {answer}")

    def set_key_enabled(self, user: str, key_id: str, enabled: bool) -> None:
        """POST /api/auth/api-key/update {"enabled": ...} as the user: disable or re-enable."""
        answer = self._json(
            self.http.post(
                "/api/auth/api-key/update",
                json={"keyId": key_id, "enabled": enabled},
                headers=self._as_user(user),
            ),
            "update key",
        )
        if answer.get("enabled") is not enabled:
            raise BetterAuthError(f"update key: {answer}")

    # --- the two ways hatchd can verify a key --------------------------------------------

    def verify(self, key: str) -> dict[str, Any]:
        """POST /api/hatch/verify-key: {"valid": true, "userId": ...} or {"valid": false}."""
        return dict(self._json(self.http.post(VERIFY_PATH, json={"key": key}), "verify-key"))

    def get_session(self, key: str) -> httpx.Response:
        """GET /api/auth/get-session with x-api-key (the raw answer: status and body)."""
        return self.http.get("/api/auth/get-session", headers={"x-api-key": key})
