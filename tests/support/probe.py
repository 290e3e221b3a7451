"""A guest that probes addresses from the inside and publishes what it reached.

The guest's user_data serves /srv/www on port 8080 and runs rounds of probes; each round is
published whole (written aside, then renamed) as /probes: a line "round N", then one line
"<name> reached|blocked" per probe. A TCP probe counts as reached only when the service sent
bytes back, so "reached" always means something was listening and answered; an ICMP probe
when an echo reply came back. A TCP probe opens with an SSH identification line: the SSH
gateway answers nothing before one, and an HTTP server answers it with a 400."""

from __future__ import annotations

from tests.support.wait import http_text, wait_for

_HEAD = """#!/bin/sh
mkdir -p /srv/www
busybox httpd -p 8080 -h /srv/www
tcp() {
  if printf 'SSH-2.0-probe\\r\\n' | timeout 5 nc "$2" "$3" 2>/dev/null \\
      | head -c 64 | grep -q .; then
    echo "$1 reached"
  else
    echo "$1 blocked"
  fi
}
icmp() {
  if timeout 5 ping -c 1 -W 3 "$2" > /dev/null 2>&1; then
    echo "$1 reached"
  else
    echo "$1 blocked"
  fi
}
"""


def probe_script(
    tcp: dict[str, tuple[str, int]], icmp: dict[str, str] | None = None, rounds: int = 1
) -> str:
    """user_data probing each named host:port (and host, for ICMP) `rounds` times in a row."""
    lines = [f"  tcp {name} {host} {port}" for name, (host, port) in tcp.items()]
    lines += [f"  icmp {name} {host}" for name, host in (icmp or {}).items()]
    body = "\n".join(lines)
    return (
        _HEAD
        + f"""n=0
while [ $n -lt {rounds} ]; do
  n=$((n + 1))
  {{
  echo "round $n"
{body}
  }} > /srv/www/probes.tmp
  mv /srv/www/probes.tmp /srv/www/probes
done &
"""
    )


def parse(text: str) -> tuple[int, dict[str, str]]:
    lines = text.strip().splitlines()
    round_no = int(lines[0].removeprefix("round "))
    pairs = (line.split(" ", 1) for line in lines[1:])
    return round_no, {name: outcome for name, outcome in pairs}


def probe_results(guest_ip: str, after_round: int = 0, timeout: float = 180) -> dict[str, str]:
    """The first published round later than `after_round`, read from the host."""

    def fresh() -> dict[str, str] | None:
        text = http_text(f"http://{guest_ip}:8080/probes", timeout=3)
        if not text:
            return None
        round_no, results = parse(text)
        return results if round_no > after_round else None

    return wait_for(fresh, timeout, f"probe results from {guest_ip} after round {after_round}")


def latest_round(guest_ip: str) -> int:
    text = http_text(f"http://{guest_ip}:8080/probes", timeout=3)
    return parse(text)[0] if text else 0
