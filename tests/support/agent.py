"""The guest agent compiled as the image builder does, served on a Unix socket: each connection
gets its own `hatch-agent --stdio` (unprivileged when the tests run as root) reading and writing
the connection, so hatchd's AgentChannel talks to the real agent without a VM."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from hatchvm.images.builder import AGENT_CFLAGS, AGENT_SOURCE

# Root gives up every privilege first: nothing the agent runs can touch the host's clock.
UNPRIVILEGED = (
    ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    if os.geteuid() == 0
    else []
)


@contextlib.contextmanager
def built_agent() -> Iterator[Path]:
    # Not under pytest's private temp dir: the unprivileged user must be able to run it.
    out = Path(tempfile.mkdtemp(prefix="hatch-agent-"))
    try:
        out.chmod(0o755)
        source = out / "hatch-agent.c"
        source.write_bytes(
            resources.files("hatchvm.images").joinpath("guest", *AGENT_SOURCE).read_bytes()
        )
        binary = out / "hatch-agent"
        subprocess.run(["gcc", *AGENT_CFLAGS, "-o", str(binary), str(source)], check=True)
        yield binary
    finally:
        shutil.rmtree(out, ignore_errors=True)


class AgentServer:
    """A Unix socket whose every connection is served by a fresh agent process."""

    def __init__(self, binary: Path, path: Path) -> None:
        self.binary = binary
        self.path = path
        self.agents: list[subprocess.Popen[bytes]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(4)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                agent = subprocess.Popen(
                    [*UNPRIVILEGED, str(self.binary), "--stdio"],
                    stdin=conn,
                    stdout=conn,
                    stderr=subprocess.DEVNULL,
                )
            self.agents.append(agent)

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)
        for agent in self.agents:
            if agent.poll() is None:
                agent.kill()
            agent.wait(10)
