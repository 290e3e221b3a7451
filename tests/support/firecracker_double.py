"""A test double of the Firecracker binary: it serves Firecracker's API on its Unix socket and
holds every request to Firecracker's published contract, but runs no guest.

Run as the "firecracker binary" (see `launcher`): `firecracker_double --api-sock PATH --id ID`.

- Every body is validated against the swagger file's schema for its path and method; objects
  refuse unknown fields (Firecracker's serde `deny_unknown_fields`), wrong types and missing
  required fields. A refusal is a 400 with a `fault_message`, as Firecracker answers.
- Ordering: pre-boot calls are refused once the instance started (or a snapshot was loaded);
  runtime calls (pause/resume, snapshot create, Ctrl-Alt-Del) before it; a snapshot is created
  only while paused; a snapshot is loaded only by a fresh process (logger, metrics and serial
  may come first, nothing else); a failed load ends the process, as it ends Firecracker.
- Files: the kernel, initrd and drives must exist when configured, a TAP device when a network
  interface is added; snapshot create writes a memory file of the configured size and a state
  file (JSON with a checksum) that load verifies.
- The "guest": on start it writes a few lines to the serial output (a named pipe, opened like
  Firecracker opens it: O_RDWR | O_NONBLOCK); Ctrl-Alt-Del makes it reset, so the process exits
  0, unless it runs with FC_DOUBLE_GUEST=stubborn (a guest that ignores it: `launcher(dir,
  guest="stubborn")`; the driver gives Firecracker none of hatchd's environment).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema_rs
import yaml
from aiohttp import web

from tests.support.fc_swagger import REPO, SWAGGER

VERSION = "1.17.0-double"
STATE_MAGIC = "firecracker-double-state"
MIB = 1 << 20
TUNSETIFF = 0x400454CA
IFF_TAP_FLAGS = 0x0002 | 0x1000 | 0x4000  # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR

# Which calls belong to which phase (Firecracker's PrebootApiController/RuntimeApiController).
PRE_BOOT = {
    ("PUT", "/boot-source"),
    ("PUT", "/cpu-config"),
    ("PUT", "/drives/{drive_id}"),
    ("PUT", "/pmem/{id}"),
    ("PUT", "/logger"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/metrics"),
    ("PUT", "/mmds/config"),
    ("PUT", "/entropy"),
    ("PUT", "/serial"),
    ("PUT", "/hotplug/memory"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PUT", "/snapshot/load"),
    ("PUT", "/vsock"),
    ("PUT", "/balloon"),
}
RUNTIME = {
    ("PATCH", "/vm"),
    ("PUT", "/snapshot/create"),
    ("PATCH", "/drives/{drive_id}"),
    ("PATCH", "/pmem/{id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PATCH", "/balloon"),
    ("GET", "/balloon/statistics"),
    ("PATCH", "/balloon/statistics"),
    ("PATCH", "/hotplug/memory"),
}
# Configured before a snapshot load without making it a boot (Firecracker's boot_path).
NOT_BOOT_PATH = {
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/serial"),
    ("PUT", "/cpu-config"),
}
POST_BOOT_REFUSAL = "The requested operation is not supported after starting the microVM."
PRE_BOOT_REFUSAL = "The requested operation is not supported before starting the microVM."


class Fault(Exception):
    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.fatal = fatal  # the process ends after answering (a failed snapshot load)


@dataclass
class Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    schema: jsonschema_rs.Draft4Validator | None
    body_required: bool


def _strict(node: Any) -> Any:
    """Every object schema refuses properties it does not list (unless it says otherwise)."""
    if isinstance(node, dict):
        node = {key: _strict(value) for key, value in node.items()}
        if node.get("type") == "object" and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(item) for item in node]
    return node


def load_routes(swagger_path: Path = SWAGGER) -> list[Route]:
    swagger = yaml.safe_load(swagger_path.read_text())
    definitions = _strict(swagger["definitions"])
    routes = []
    for template, methods in swagger["paths"].items():
        pattern = re.compile("^" + re.sub(r"\{[^}]+\}", r"(?P<id>[^/]+)", template) + "$")
        for method, operation in methods.items():
            body = next((p for p in operation.get("parameters", []) if p["in"] == "body"), None)
            schema = None
            if body is not None:
                schema = jsonschema_rs.Draft4Validator(
                    {**body["schema"], "definitions": definitions}
                )
            required = bool(body and body.get("required"))
            routes.append(Route(method.upper(), template, pattern, schema, required))
    return routes


def _crc(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _open_nonblock(path: str) -> int:
    """As Firecracker's open_file_nonblock: created if missing, a pipe never blocks."""
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _write(fd: int | None, text: str) -> None:
    if fd is not None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            os.write(fd, text.encode())


@dataclass
class Instance:
    vm_id: str
    state: str = "Not started"  # "Running", "Paused"
    boot_path: bool = False  # something but logger/metrics/serial was configured
    loaded: bool = False
    boot_source: dict[str, Any] | None = None
    machine: dict[str, Any] = field(default_factory=lambda: {"vcpu_count": 1, "mem_size_mib": 128})
    drives: dict[str, dict[str, Any]] = field(default_factory=dict)
    ifaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    serial_path: str | None = None
    serial_fd: int | None = None
    log_fd: int | None = None
    metrics_fd: int | None = None
    entropy: bool = False

    @property
    def started(self) -> bool:
        return self.state != "Not started"

    def log(self, line: str) -> None:
        _write(self.log_fd, f"[{self.vm_id}:fc_api] {line}\n")

    def console(self, line: str) -> None:
        _write(self.serial_fd, line + "\n")

    def open_serial(self) -> None:
        if self.serial_path is not None and self.serial_fd is None:
            self.serial_fd = _open_nonblock(self.serial_path)


def _require_file(what: str, path: str, write: bool = False) -> None:
    """Open it as Firecracker does (read-only, or read-write for a writable drive): under the
    jailer as the jail's uid, inside the jail."""
    try:
        os.close(os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC))
    except OSError as exc:
        raise Fault(
            f"{what} cannot be opened: {exc.strerror} (os error {exc.errno}): {path}"
        ) from None


def _open_tap(name: str) -> int:
    """Attach to the TAP through /dev/net/tun, as Firecracker does (TUNSETIFF with IFF_TAP |
    IFF_NO_PI | IFF_VNET_HDR); jailed, that is the jail's node, as the jail's uid."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP_FLAGS))
    except OSError:
        os.close(fd)
        raise
    return fd


class Double:
    def __init__(self, vm_id: str, routes: list[Route], jailed: bool = False) -> None:
        self.vm = Instance(vm_id)
        self.routes = routes
        self.jailed = jailed  # started by the jailer: opens TAPs through the jail's /dev/net/tun
        self.taps: list[int] = []
        self.guest = os.environ.get("FC_DOUBLE_GUEST", "normal")
        self.exit_code: int | None = None

    async def handle(self, request: web.Request) -> web.Response:
        method, path = request.method, request.path
        route = next((r for r in self.routes if r.method == method and r.pattern.match(path)), None)
        if route is None:
            return _fault(400, f"Invalid request method and/or path: {method} {path}.")
        raw = await request.read()
        try:
            body = self._body(route, raw)
            self._check_phase(route, body)
            answer = self._dispatch(route, route.pattern.match(path), body)  # type: ignore[arg-type]
        except Fault as fault:
            self.vm.log(f"{method} {path}: {fault.message}")
            if fault.fatal:
                self._exit_soon(1)
            return _fault(400, fault.message)
        self.vm.log(f"{method} {path}: ok")
        if answer is None:
            return web.Response(status=204)
        return web.json_response(answer)

    @staticmethod
    def _body(route: Route, raw: bytes) -> Any:
        if route.schema is None:
            return None
        if not raw:
            if route.body_required:
                raise Fault("Empty request body: a JSON body is required.")
            return None
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise Fault(
                f"An error occurred when deserializing the json body of a request: {exc}"
            ) from None
        errors = [
            f"{'/'.join(map(str, e.instance_path)) or 'body'}: {e.message}"
            for e in route.schema.iter_errors(body)
        ]
        if errors:
            raise Fault(
                "An error occurred when deserializing the json body of a request: "
                + "; ".join(errors)
            )
        return body

    def _check_phase(self, route: Route, body: Any) -> None:
        key = (route.method, route.template)
        action = body.get("action_type") if route.template == "/actions" else None
        if self.vm.started and (key in PRE_BOOT or action == "InstanceStart"):
            raise Fault(POST_BOOT_REFUSAL)
        if not self.vm.started and (key in RUNTIME or action in ("SendCtrlAltDel", "FlushMetrics")):
            raise Fault(PRE_BOOT_REFUSAL)

    def _dispatch(self, route: Route, match: re.Match[str], body: Any) -> Any:
        vm = self.vm
        key = (route.method, route.template)
        if key not in NOT_BOOT_PATH and key in PRE_BOOT and key != ("PUT", "/snapshot/load"):
            vm.boot_path = True
        match key:
            case ("GET", "/"):
                return {
                    "app_name": "Firecracker",
                    "id": vm.vm_id,
                    "state": vm.state,
                    "vmm_version": VERSION,
                }
            case ("GET", "/version"):
                return {"firecracker_version": VERSION}
            case ("GET", "/machine-config"):
                return vm.machine
            case ("GET", "/vm/config"):
                return {
                    "boot-source": vm.boot_source or {},
                    "machine-config": vm.machine,
                    "drives": list(vm.drives.values()),
                    "network-interfaces": list(vm.ifaces.values()),
                }
            case ("PUT", "/logger"):
                if vm.log_fd is not None:
                    raise Fault("Logger error: the logger can only be configured once.")
                if "log_path" in body:
                    vm.log_fd = _open_nonblock(body["log_path"])
            case ("PUT", "/metrics"):
                if vm.metrics_fd is not None:
                    raise Fault("Metrics error: Reinitialization of metrics not allowed.")
                vm.metrics_fd = _open_nonblock(body["metrics_path"])
            case ("PUT", "/serial"):
                vm.serial_path = body.get("serial_out_path")
            case ("PUT", "/boot-source"):
                _require_file("Boot source error: The kernel file", body["kernel_image_path"])
                if "initrd_path" in body:
                    _require_file("Boot source error: The initrd file", body["initrd_path"])
                vm.boot_source = body
            case ("PUT", "/machine-config"):
                vm.machine = body
            case ("PUT", "/drives/{drive_id}"):
                if body["drive_id"] != match.group("id"):
                    raise Fault("The id from the path does not match the id from the body!")
                if "path_on_host" not in body or "is_read_only" not in body:
                    raise Fault("Drive config error: path_on_host and is_read_only are required.")
                _require_file(
                    "Drive config error: the block device",
                    body["path_on_host"],
                    write=not body["is_read_only"],
                )
                vm.drives[body["drive_id"]] = body
            case ("PUT", "/network-interfaces/{iface_id}"):
                if body["iface_id"] != match.group("id"):
                    raise Fault("The id from the path does not match the id from the body!")
                tap = body["host_dev_name"]
                try:  # this network namespace's (sysfs may show another's)
                    socket.if_nametoindex(tap)
                    if self.jailed:
                        self.taps.append(_open_tap(tap))
                except OSError:
                    raise Fault(
                        f"Network interface error: Could not create the network device: "
                        f"Open tap device failed: {tap}"
                    ) from None
                vm.ifaces[body["iface_id"]] = body
            case ("PUT", "/entropy"):
                vm.entropy = True
            case ("PUT", "/actions"):
                return self._action(body["action_type"])
            case ("PATCH", "/vm"):
                vm.state = "Paused" if body["state"] == "Paused" else "Running"
                if vm.state == "Running":
                    vm.console("[double] guest resumed")
            case ("PUT", "/snapshot/create"):
                self._create_snapshot(body)
            case ("PUT", "/snapshot/load"):
                self._load_snapshot(body)
            case _:
                pass  # documented, validated, nothing to simulate
        return None

    def _action(self, action: str) -> None:
        vm = self.vm
        if action == "InstanceStart":
            if vm.boot_source is None:
                raise Fault("Start microvm error: Missing kernel configuration.")
            vm.state = "Running"
            vm.open_serial()
            vm.console("[double] Linux version 6.1.0 (firecracker double) booting")
            vm.console(f"[double] {len(vm.drives)} drives, {len(vm.ifaces)} network interfaces")
        elif action == "SendCtrlAltDel":
            if self.guest != "stubborn" and vm.state == "Running":
                vm.console("[double] ctrl-alt-del: the guest shuts down and resets")
                self._exit_soon(0)
        elif action == "FlushMetrics":
            _write(vm.metrics_fd, json.dumps({"utc_timestamp_ms": 0, "api_server": {}}) + "\n")

    def _create_snapshot(self, body: dict[str, Any]) -> None:
        vm = self.vm
        if vm.state != "Paused":
            raise Fault("Create snapshot error: the microVM is not paused.")
        if body.get("snapshot_type", "Full") != "Full":
            raise Fault("Create snapshot error: the double makes full snapshots only.")
        size = int(vm.machine["mem_size_mib"]) * MIB
        payload = {
            "machine": vm.machine,
            "drives": vm.drives,
            "ifaces": vm.ifaces,
            "mem_bytes": size,
        }
        state = {"magic": STATE_MAGIC, "version": VERSION, "crc": _crc(payload), **payload}
        try:
            with open(body["mem_file_path"], "wb") as mem:
                mem.write(b"FCDOUBLE" + vm.vm_id.encode())
                mem.truncate(size)
            Path(body["snapshot_path"]).write_text(json.dumps(state))
        except OSError as exc:
            raise Fault(f"Create snapshot error: {exc.strerror} (os error {exc.errno})") from None

    def _load_snapshot(self, body: dict[str, Any]) -> None:
        vm = self.vm
        if vm.boot_path:
            raise Fault(
                "Load snapshot error: Loading a microVM snapshot not allowed after configuring "
                "boot-specific resources."
            )
        try:
            state = json.loads(Path(body["snapshot_path"]).read_text())
            payload = {k: state[k] for k in ("machine", "drives", "ifaces", "mem_bytes")}
            if state["magic"] != STATE_MAGIC or state["crc"] != _crc(payload):
                raise ValueError("bad magic or CRC")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise Fault(
                f"Load snapshot error: Failed to restore from snapshot: Failed to load the "
                f"microVM state: {exc}",
                fatal=True,
            ) from None
        mem_path = body["mem_backend"]["backend_path"]
        try:
            os.close(os.open(mem_path, os.O_RDONLY | os.O_CLOEXEC))  # mapped privately: read-only
            mem_size = os.path.getsize(mem_path)
        except OSError as exc:
            raise Fault(
                f"Load snapshot error: Failed to restore from snapshot: Cannot open the memory "
                f"file: {exc.strerror}",
                fatal=True,
            ) from None
        if mem_size != payload["mem_bytes"]:
            raise Fault(
                "Load snapshot error: Failed to restore from snapshot: the memory file's size "
                f"{mem_size} does not match the state's {payload['mem_bytes']}",
                fatal=True,
            )
        for drive in payload["drives"].values():
            try:
                _require_file("block device", drive["path_on_host"], not drive["is_read_only"])
            except Fault:
                raise Fault(
                    f"Load snapshot error: Failed to restore from snapshot: block device "
                    f"{drive['path_on_host']} cannot be opened",
                    fatal=True,
                ) from None
        if self.jailed:
            for iface in payload["ifaces"].values():
                try:
                    self.taps.append(_open_tap(iface["host_dev_name"]))
                except OSError as exc:
                    raise Fault(
                        f"Load snapshot error: Failed to restore from snapshot: Open tap device "
                        f"failed: {iface['host_dev_name']}: {exc.strerror}",
                        fatal=True,
                    ) from None
        vm.machine, vm.drives, vm.ifaces = payload["machine"], payload["drives"], payload["ifaces"]
        vm.boot_path, vm.loaded = True, True
        vm.state = "Running" if body.get("resume_vm") else "Paused"
        vm.open_serial()
        vm.console("[double] snapshot loaded")

    def _exit_soon(self, code: int) -> None:
        """After the answer is sent: Firecracker ends on a guest reset or a failed load."""
        self.exit_code = code
        asyncio.get_running_loop().call_later(0.05, os._exit, code)


def _fault(status: int, message: str) -> web.Response:
    return web.json_response({"fault_message": message}, status=status)


async def serve(api_sock: Path, vm_id: str, jailed: bool) -> None:
    double = Double(vm_id, load_routes(), jailed)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", double.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, str(api_sock)).start()
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="firecracker")
    parser.add_argument("--api-sock", required=True, type=Path)
    parser.add_argument("--id", default="anonymous-instance")
    # What the jailer passes (its timing): present only when started by it.
    parser.add_argument("--start-time-us", type=int)
    parser.add_argument("--start-time-cpu-us", type=int)
    parser.add_argument("--parent-cpu-time-us", type=int)
    given = sys.argv[1:] if argv is None else argv
    for flag in {a for a in given if a.startswith("--")}:
        if given.count(flag) > 1:  # Firecracker's parser refuses a repeated argument
            print(f"The argument '{flag[2:]}' was provided more than once.", file=sys.stderr)
            sys.exit(153)
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", args.id):
        print(f"Invalid instance ID: {args.id}", file=sys.stderr)
        sys.exit(153)  # Firecracker's exit code for bad arguments
    if args.api_sock.exists():
        print(f"Failed to open the API socket at {args.api_sock}: Address in use", file=sys.stderr)
        sys.exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    asyncio.run(serve(args.api_sock, args.id, jailed=args.start_time_us is not None))


def launcher(directory: Path, guest: str = "normal") -> Path:
    """An executable that runs the double with this interpreter: HATCH_FIRECRACKER_BIN.
    Called again with another guest, it changes what later starts get."""
    path = directory / "firecracker"
    # Its settings are in the script: the jailer starts it with an empty environment.
    path.write_text(
        f"#!/bin/sh\nFC_DOUBLE_GUEST={guest} HATCH_FIRECRACKER_SWAGGER={SWAGGER}"
        f' PYTHONPATH={REPO} exec {sys.executable} -m tests.support.firecracker_double "$@"\n'
    )
    path.chmod(0o755)
    return path


if __name__ == "__main__":
    main()
