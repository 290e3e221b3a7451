"""Errors have a shape: the layers below core raise their own typed errors (never the API's
status-carrying ones), and the API maps each to a status, keeping its message."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from hatchvm.api.errors import install_error_handlers
from hatchvm.images.errors import DiskError, UserDataError
from hatchvm.net.errors import NetworkError
from hatchvm.vmm.base import VMMStartFailed, VMMUnsupported

SRC = Path(__file__).resolve().parents[2] / "src" / "hatchvm"
LOWER_LAYERS = ("images", "net", "vmm", "snapshots", "agent")


@pytest.mark.parametrize("package", LOWER_LAYERS)
def test_lower_layers_never_raise_the_apis_errors(package: str) -> None:
    for module in (SRC / package).rglob("*.py"):
        tree = ast.parse(module.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "hatchvm.errors", f"{module} imports hatchvm.errors"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (UserDataError("user_data: must not contain NUL bytes"), 400),
        (DiskError("mkfs.ext4 of the VM disk failed: no space"), 500),
        (NetworkError("cannot set up TAP hvx on hatchbr0: busy"), 500),
        (VMMStartFailed("qemu failed to start (exit 1): boom", vm_id="vm_x", op="boot"), 500),
        (VMMUnsupported("the fake driver does not support snapshots yet"), 501),
    ],
)
def test_the_api_maps_each_typed_error(error: Exception, status: int) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise error

    answer = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert answer.status_code == status
    assert answer.json() == {"error": str(error.message)}  # type: ignore[attr-defined]
