"""Python SDK for the hatchvm API (used by the CLI and the tests).

with HatchClient("http://127.0.0.1:8080", "hatch_...") as api:
    vm = api.create_vm(mem_mib=256, user_data="#!/bin/sh\\n...")
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"


class HatchAPIError(Exception):
    """The API answered with an error: .status and .message from {"error": ...}, .body the
    whole answer (an exec that timed out carries its output there)."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{message} ({status})" if status else message)
        self.status = status
        self.message = message
        self.body = body or {}


class HatchConnectionError(HatchAPIError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(0, f"cannot reach hatchd at {url}: {reason}")


def _result(response: httpx.Response) -> Any:
    """The JSON of a successful answer, or HatchAPIError with the server's message."""
    if response.is_success:
        return response.json()
    body: dict[str, Any] = {}
    try:
        parsed = response.json()
        body = parsed if isinstance(parsed, dict) else {}
        message = body.get("error") or response.text
    except ValueError:
        message = response.text.strip() or response.reason_phrase
    raise HatchAPIError(response.status_code, str(message), body)


def _fields(**values: Any) -> dict[str, Any]:
    """Only the fields the caller gave, so the server's defaults apply to the rest."""
    return {k: v for k, v in values.items() if v is not None}


def _settings(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    url = (base_url or os.environ.get("HATCH_API_URL") or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get("HATCH_API_KEY", "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return url, headers


class _Routes:
    """Method, path and body of every call, shared by the sync and async clients."""

    @staticmethod
    def create_vm(**body: Any) -> tuple[str, str, Any]:
        return "POST", "/vms", _fields(**body)

    @staticmethod
    def restore_vm(vm_id: str, snapshot_id: str | None) -> tuple[str, str, Any]:
        return "POST", f"/vms/{vm_id}/restore", _fields(snapshot_id=snapshot_id)

    @staticmethod
    def create_route(
        vm_id: str, target_port: int, subdomain: str | None, auto_wake: bool | None
    ) -> tuple[str, str, Any]:
        body = _fields(target_port=target_port, subdomain=subdomain, auto_wake=auto_wake)
        return "POST", f"/vms/{vm_id}/routes", body


class HatchClient:
    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float = 120.0
    ) -> None:
        self.base_url, headers = _settings(base_url, api_key)
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> HatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, json: Any = None, **kwargs: Any) -> httpx.Response:
        """The raw response, without raising on error statuses."""
        try:
            return self._http.request(method, path, json=json, **kwargs)
        except httpx.TransportError as exc:
            raise HatchConnectionError(self.base_url, str(exc) or type(exc).__name__) from None

    def _call(self, method: str, path: str, json: Any = None, **kwargs: Any) -> Any:
        return _result(self.request(method, path, json, **kwargs))

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A successful response whose body is read as it comes (errors raised first)."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if not response.is_success:
                    response.read()
                    _result(response)
                yield response
        except httpx.TransportError as exc:
            raise HatchConnectionError(self.base_url, str(exc) or type(exc).__name__) from None

    def health(self) -> Any:
        return self._call("GET", "/healthz")

    def create_vm(
        self,
        *,
        image_id: str | None = None,
        vcpu_count: int | None = None,
        mem_mib: int | None = None,
        enable_network: bool | None = None,
        user_data: str | None = None,
        boot_args: str | None = None,
        restart: str | None = None,
        egress: str | None = None,
    ) -> Any:
        return self._call(
            *_Routes.create_vm(
                image_id=image_id,
                vcpu_count=vcpu_count,
                mem_mib=mem_mib,
                enable_network=enable_network,
                egress=egress,
                user_data=user_data,
                boot_args=boot_args,
                restart=restart,
            )
        )

    def list_vms(self) -> Any:
        return self._call("GET", "/vms")

    def get_vm(self, vm_id: str) -> Any:
        return self._call("GET", f"/vms/{vm_id}")

    def stop_vm(self, vm_id: str) -> Any:
        return self._call("POST", f"/vms/{vm_id}/stop")

    def start_vm(self, vm_id: str) -> Any:
        return self._call("POST", f"/vms/{vm_id}/start")

    def delete_vm(self, vm_id: str) -> Any:
        return self._call("DELETE", f"/vms/{vm_id}")

    def console(self, vm_id: str, lines: int = 100) -> str:
        """The last lines of the guest's console."""
        response = self.request("GET", f"/vms/{vm_id}/console?lines={lines}")
        if not response.is_success:
            _result(response)
        return response.text

    def follow_console(self, vm_id: str, lines: int = 100) -> Iterator[bytes]:
        """The console's last lines, then its new output until the VM's VMM ends."""
        url = f"/vms/{vm_id}/console?lines={lines}&follow=true"
        try:
            with self._http.stream("GET", url, timeout=httpx.Timeout(None)) as response:
                if not response.is_success:
                    response.read()
                    _result(response)
                yield from response.iter_bytes()
        except httpx.TransportError as exc:
            raise HatchConnectionError(self.base_url, str(exc) or type(exc).__name__) from None

    def snapshot_vm(self, vm_id: str, wait_stored: bool = False) -> Any:
        """The snapshot, as soon as the guest is captured (`storing`); with wait_stored, once
        it is stored (or failed)."""
        snap = self._call("POST", f"/vms/{vm_id}/snapshot")
        return self.wait_stored(snap["id"]) if wait_stored else snap

    def wait_stored(self, snapshot_id: str, timeout: float = 900.0) -> Any:
        """The snapshot once it is no longer `storing` (stored or failed)."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            snap = self.get_snapshot(snapshot_id)
            if snap["status"] != "storing":
                return snap
            if time.monotonic() > deadline:
                raise HatchAPIError(0, f"snapshot {snapshot_id} still storing after {timeout:g}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def restore_vm(self, vm_id: str, snapshot_id: str | None = None) -> Any:
        return self._call(*_Routes.restore_vm(vm_id, snapshot_id))

    def fork_vm(self, vm_id: str, count: int = 1) -> Any:
        """count new VMs running from this one as it is now (or as its latest snapshot
        holds it): the list of them."""
        return self._call("POST", f"/vms/{vm_id}/fork", {"count": count}, timeout=300)

    def fork_snapshot(self, snapshot_id: str, count: int = 1) -> Any:
        return self._call("POST", f"/snapshots/{snapshot_id}/fork", {"count": count}, timeout=300)

    def list_snapshots(self, vm_id: str) -> Any:
        return self._call("GET", f"/vms/{vm_id}/snapshots")

    def get_snapshot(self, snapshot_id: str) -> Any:
        return self._call("GET", f"/snapshots/{snapshot_id}")

    def delete_snapshot(self, snapshot_id: str) -> Any:
        return self._call("DELETE", f"/snapshots/{snapshot_id}")

    def create_route(
        self,
        vm_id: str,
        target_port: int,
        subdomain: str | None = None,
        auto_wake: bool | None = None,
    ) -> Any:
        return self._call(*_Routes.create_route(vm_id, target_port, subdomain, auto_wake))

    def list_routes(self, vm_id: str) -> Any:
        return self._call("GET", f"/vms/{vm_id}/routes")

    def delete_route(self, route_id: str) -> Any:
        return self._call("DELETE", f"/routes/{route_id}")

    def list_images(self) -> Any:
        return self._call("GET", "/images")

    def get_image(self, image_id: str) -> Any:
        return self._call("GET", f"/images/{image_id}")

    # ---- inside a VM: exec, processes, files ---------------------------------------------

    def exec(
        self,
        vm_id: str,
        cmd: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
        background: bool | None = None,
    ) -> Any:
        """Run cmd and wait: {exit_code, signal, timed_out, stdout, stderr, truncated}; with
        background, the process at once."""
        body = _fields(
            cmd=cmd, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s, background=background
        )
        wait = (timeout_s or 60) + 60  # the command's own timeout, and a wake
        return self._call("POST", f"/vms/{vm_id}/exec", body, timeout=wait)

    def exec_stream(
        self,
        vm_id: str,
        cmd: list[str] | str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The command's events as they happen: started, stdout/stderr (data), exit (or
        error)."""
        body = _fields(cmd=cmd, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s)
        timeout = httpx.Timeout(120.0, read=None)  # a quiet command is no failure
        with self._stream("POST", f"/vms/{vm_id}/exec/stream", json=body, timeout=timeout) as r:
            try:
                for line in r.iter_lines():
                    if line:
                        yield json.loads(line)
            except httpx.TransportError as exc:
                raise HatchConnectionError(self.base_url, str(exc) or "stream broken") from None

    def list_processes(self, vm_id: str) -> Any:
        return self._call("GET", f"/vms/{vm_id}/processes")

    def get_process(self, vm_id: str, pid: int) -> Any:
        return self._call("GET", f"/vms/{vm_id}/processes/{pid}")

    def kill_process(self, vm_id: str, pid: int, signal: str | None = None) -> Any:
        return self._call("POST", f"/vms/{vm_id}/processes/{pid}/kill", _fields(signal=signal))

    def delete_process(self, vm_id: str, pid: int) -> Any:
        return self._call("DELETE", f"/vms/{vm_id}/processes/{pid}")

    def upload_file(
        self,
        vm_id: str,
        path: str,
        content: bytes | Iterable[bytes],
        *,
        mode: int | None = None,
        parents: bool = False,
    ) -> Any:
        """Write content (bytes, or an iterable of chunks sent as they come) to path."""
        params: dict[str, Any] = {"path": path, "parents": str(parents).lower()}
        if mode is not None:
            params["mode"] = f"{mode:04o}"
        headers = {"Content-Type": "application/octet-stream"}
        timeout = httpx.Timeout(120.0, write=None)
        return self._call(
            "PUT",
            f"/vms/{vm_id}/files",
            params=params,
            content=content,
            headers=headers,
            timeout=timeout,
        )

    def download_file(self, vm_id: str, path: str) -> Iterator[bytes]:
        """The file's bytes as they come. A download broken off midway raises, never ends
        as if the file were whole."""
        timeout = httpx.Timeout(120.0, read=300.0)
        with self._stream(
            "GET", f"/vms/{vm_id}/files", params={"path": path}, timeout=timeout
        ) as r:
            try:
                yield from r.iter_bytes()
            except httpx.TransportError as exc:
                raise HatchConnectionError(self.base_url, str(exc) or "download broken") from None

    def stat_file(self, vm_id: str, path: str) -> Any:
        return self._call("GET", f"/vms/{vm_id}/files/stat", params={"path": path})

    def list_files(self, vm_id: str, path: str) -> Any:
        return self._call("GET", f"/vms/{vm_id}/files/list", params={"path": path})

    def delete_file(self, vm_id: str, path: str, *, recursive: bool = False) -> Any:
        params = {"path": path, "recursive": str(recursive).lower()}
        return self._call("DELETE", f"/vms/{vm_id}/files", params=params)
