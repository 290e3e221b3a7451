"""Fixtures most integration tests share: a started hatchd on the tests' defaults, and a client
of one user's. A module that needs other settings defines its own `hatch`; `api` follows it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def hatch(daemon_factory: Any) -> Any:
    d = daemon_factory()
    d.start()
    return d


@pytest.fixture
def api(hatch: Any) -> Iterator[Any]:
    with hatch.client(hatch.create_key("alice")) as client:
        yield client
