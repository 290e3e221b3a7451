"""Subdomain rules: the validator and the pattern the OpenAPI document states agree."""

from __future__ import annotations

import re

import pytest

from hatchvm.api.schemas import RouteCreate
from hatchvm.core.subdomains import RESERVED, random_subdomain, subdomain_problem

# A fixed id for the random one: every xdist worker must collect the same test names.
GOOD = ["a", "0", "myapp", "my-app-2", "a" * 63, pytest.param(random_subdomain(), id="random")]
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


@pytest.mark.parametrize("name", GOOD + BAD)
def test_document_states_the_same_rule(name: str) -> None:
    schema = RouteCreate.model_json_schema()["properties"]["subdomain"]["anyOf"][0]
    # JSON Schema's $ (ECMA 262, no multiline flag) matches only at the very end: \Z in Python.
    pattern = schema["pattern"].removesuffix("$") + r"\Z"
    by_schema = re.search(pattern, name) is not None and name not in schema["not"]["enum"]
    assert by_schema == (subdomain_problem(name) is None)
    assert set(schema["not"]["enum"]) == RESERVED
