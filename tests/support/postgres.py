"""A real PostgreSQL server for the tests: Debian's postgresql package, initdb'd into a temp dir,
listening on a Unix socket there and on a free 127.0.0.1 port, removed at the end.

PostgreSQL refuses to run as root, so a root test run starts it as the `postgres` user the
package creates (or `nobody`), with the temp dir handed to that user."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from tests.support.daemon import free_port

SUPERUSER = "hatch"
PR_SET_PDEATHSIG = 1
_databases = itertools.count(1)


def bin_dir() -> Path | None:
    """Where initdb and postgres are: PATH first, then Debian's versioned directories."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).resolve().parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(versions[-1]).parent if versions else None


def skip_reason() -> str | None:
    """Why no server can be started here, or None."""
    if bin_dir() is None:
        return "PostgreSQL is not installed (initdb not found; scripts/install adds postgresql)"
    if os.geteuid() == 0 and _unprivileged_user() is None:
        return "running as root and neither a postgres nor a nobody user exists to run PostgreSQL"
    return None


def _unprivileged_user() -> pwd.struct_passwd | None:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


@dataclass
class PostgresServer:
    root: Path  # everything of this server: data dir, socket, log
    port: int
    proc: subprocess.Popen[bytes]
    databases: list[str] = field(default_factory=list)

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def socket_url(self, database: str) -> str:
        """The form hatchd's README documents for a local server: no host, ?host=<socket dir>."""
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"

    def tcp_url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    async def _admin(self, sql: str) -> None:
        conn = await self._connect()
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            host=str(self.socket_dir), port=self.port, user=SUPERUSER, database="postgres"
        )

    async def terminate_backends(self, database: str) -> int:
        """End every connection to database, as a server restart would; how many there were."""
        conn = await self._connect()
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = $1",
                    database,
                )
            )
        finally:
            await conn.close()

    def create_database(self, prefix: str = "hv") -> str:
        """A fresh, empty database (one per hatchd, so no test sees another's rows)."""
        name = f"{prefix}{os.getpid()}_{next(_databases)}"
        asyncio.run(self._admin(f'CREATE DATABASE "{name}"'))
        self.databases.append(name)
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a daemon killed with SIGKILL may still have backends the server has not reaped.
        asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, keep_log: Path | None = None) -> None:
        """Shut the server down and remove it; keep_log: where to copy its log first."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: ends sessions, no waiting
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if keep_log is not None and self.log_path.exists():
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.log_path, keep_log)
        shutil.rmtree(self.root, ignore_errors=True)


def _die_with_parent(user: pwd.struct_passwd | None) -> Callable[[], None]:
    """For the server's process: become the unprivileged user, then ask the kernel for SIGQUIT
    (PostgreSQL's immediate shutdown) when the test run dies, so even a killed pytest leaves no
    server behind. The signal is asked for after the user change, which would clear it."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def run_in_child() -> None:
        if user is not None:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        prctl(PR_SET_PDEATHSIG, signal.SIGQUIT)
        if os.getppid() != parent:  # the parent died before the request was in place
            os._exit(1)

    return run_in_child


async def _accepting(host: str, port: int) -> bool:
    try:
        conn = await asyncpg.connect(
            host=host, port=port, user=SUPERUSER, database="postgres", timeout=2
        )
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    try:
        return await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


def start_postgres(timeout: float = 60) -> PostgresServer:
    """initdb + postgres, and wait until it answers on both its socket and its TCP port."""
    bindir = bin_dir()
    if bindir is None:
        raise RuntimeError("initdb not found")
    # Short: the socket path (<root>/sock/.s.PGSQL.<port>) must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="hatch-pg-", dir="/tmp"))
    (root / "sock").mkdir()
    user = _unprivileged_user() if os.geteuid() == 0 else None
    run_as: dict[str, object] = {}
    if user is not None:
        for path in (root, root / "sock"):
            os.chown(path, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    if user is not None:
        env["HOME"] = str(root)
    init = subprocess.run(
        [
            str(bindir / "initdb"), "-D", str(root / "data"), "-U", SUPERUSER,
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
        ],
        env=env, cwd=root, capture_output=True, text=True, **run_as,  # type: ignore[call-overload]
    )  # fmt: skip
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
    port = free_port()
    log = (root / "postgres.log").open("ab")  # written through the inherited descriptor
    # A server for tests only: durability is not wanted, speed is. A session time zone other
    # than UTC makes sure hatchd never relies on the server's zone.
    cmd = [
        str(bindir / "postgres"), "-D", str(root / "data"), "-p", str(port),
        "-k", str(root / "sock"), "-c", "listen_addresses=127.0.0.1",
        "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        "-c", "timezone=Pacific/Chatham", "-c", "max_connections=200",
        "-c", "log_min_messages=warning",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        preexec_fn=_die_with_parent(user),
    )  # fmt: skip
    log.close()
    server = PostgresServer(root, port, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = server.log_tail()
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"postgres exited {proc.returncode}:\n{tail}")
        if asyncio.run(_accepting(str(server.socket_dir), port)) and asyncio.run(
            _accepting("127.0.0.1", port)
        ):
            return server
        time.sleep(0.1)
    tail = server.log_tail()
    server.stop()
    raise RuntimeError(f"postgres did not accept connections within {timeout}s:\n{tail}")
