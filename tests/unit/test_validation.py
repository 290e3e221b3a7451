"""Request bodies: strict types, unknown fields, messages naming the field."""

import asyncio

import pytest
from pydantic import ValidationError
from starlette.requests import Request

from hatchvm.api.schemas import VMCreate
from hatchvm.api.validation import describe_errors, parse_body
from hatchvm.errors import BadRequest


def message_for(data: dict) -> str:
    with pytest.raises(ValidationError) as err:
        VMCreate.model_validate(data)
    return describe_errors(err.value.errors())


def test_defaults() -> None:
    body = VMCreate.model_validate({})
    assert body.image_id == "img_default" and body.enable_network is True
    assert body.vcpu_count is None and body.mem_mib is None
    assert body.egress_or_default == "internet"


def test_egress() -> None:
    assert VMCreate.model_validate({"egress": "none"}).egress_or_default == "none"
    assert VMCreate.model_validate({"enable_network": False}).egress_or_default == "none"
    assert message_for({"egress": "off"}) == "egress: input should be 'internet' or 'none'"
    assert message_for({"egress": "internet", "enable_network": False}) == (
        "egress: internet needs a network (enable_network is false)"
    )


def test_messages_name_fields() -> None:
    assert message_for({"bogus": 1}) == "bogus: unknown field"
    assert message_for({"vcpu_count": True}).startswith("vcpu_count: ")
    assert message_for({"mem_mib": "512"}).startswith("mem_mib: ")
    both = message_for({"vcpu_count": 0, "mem_mib": 1})
    assert "vcpu_count: " in both and "; mem_mib: " in both


def test_boot_args() -> None:
    assert VMCreate.model_validate({"boot_args": "  quiet   loglevel=3 "}).boot_args == (
        "quiet loglevel=3"
    )
    assert "set by hatchd" in message_for({"boot_args": "hatch.gw=1.1.1.1"})
    assert "printable" in message_for({"boot_args": "a\u00e9"})


def body_request(raw: bytes) -> Request:
    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


def parse_error(raw: bytes) -> str:
    with pytest.raises(BadRequest) as err:
        asyncio.run(parse_body(body_request(raw), VMCreate))
    return err.value.message


def test_hostile_json_is_400_not_500() -> None:
    """Regressions: found by probing the API; both escaped json.loads as 500s."""
    # An integer past Python's 4300-digit conversion limit (a ValueError, not JSONDecodeError).
    message = parse_error(b'{"vcpu_count": 1' + b"0" * 5000 + b"}")
    assert message.startswith("invalid JSON body: Exceeds the limit (4300 digits)")
    # Nesting deeper than the interpreter's recursion limit (well within the 1 MiB body).
    assert parse_error(b"[" * 100_000 + b"]" * 100_000) == "invalid JSON body: nested too deeply"


def test_body_parsing() -> None:
    assert asyncio.run(parse_body(body_request(b""), VMCreate)).image_id == "img_default"
    assert parse_error(b"{not json").startswith("invalid JSON body: Expecting")
    assert parse_error(b"\xff").startswith("invalid JSON body: ")
    assert parse_error(b"[1]") == "body must be a JSON object"
