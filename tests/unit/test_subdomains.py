"""Subdomain rules."""

from __future__ import annotations

import pytest

from hatchvm.core.subdomains import random_subdomain, subdomain_problem

GOOD = ["a", "0", "myapp", "my-app-2", "a" * 63, random_subdomain()]
BAD = ["", "-a", "a-", "MyApp", "a_b", "a.b", "a" * 64, "api", "é", "myapp\n", "\nmyapp", "a b"]


@pytest.mark.parametrize("name", GOOD)
def test_valid(name: str) -> None:
    assert subdomain_problem(name) is None


@pytest.mark.parametrize("name", BAD)
def test_invalid(name: str) -> None:
    assert subdomain_problem(name)


def test_trailing_newline_is_refused() -> None:
    """Regression: re.match with $ accepted "myapp\\n" (stored, then never routable)."""
    assert subdomain_problem("myapp\n") == "may only contain lowercase letters, digits and hyphens"
