"""Request bodies: strict types, unknown fields, messages naming the field."""

import pytest
from pydantic import ValidationError

from hatchvm.api.schemas import VMCreate
from hatchvm.api.validation import describe_errors


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
