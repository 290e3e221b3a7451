"""Input models: strict (wrong types are refused, not coerced), unknown fields refused.

Handlers parse bodies with api/validation.py; these models are also the request schemas of
/openapi.json, so what the document promises is what the validators check."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from hatchvm.core.subdomains import RESERVED, SUBDOMAIN, subdomain_problem
from hatchvm.ids import DEFAULT_IMAGE_ID
from hatchvm.net.egress import Egress

_BOOT_ARG = re.compile(r"^[\x21-\x7e]+$")

# The validator's rules, stated as JSON Schema (the pattern is anchored and has no newline
# escape hatch in JSON Schema's regex dialect, like subdomain_problem's fullmatch).
_SUBDOMAIN_SCHEMA = {
    "type": "string",
    "pattern": SUBDOMAIN.pattern,
    "not": {"enum": sorted(RESERVED)},
}


class StrictInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class VMCreate(StrictInput):
    image_id: str = Field(default=DEFAULT_IMAGE_ID, min_length=1, max_length=64)
    vcpu_count: int | None = Field(
        default=None, ge=1, le=32, description="default: HATCH_DEFAULT_VCPU"
    )
    mem_mib: int | None = Field(
        default=None, ge=128, le=65536, description="default: HATCH_DEFAULT_MEM_MIB"
    )
    enable_network: bool = True
    egress: Literal["internet", "none"] | None = Field(
        default=None,
        description="what the guest may reach beyond the host; default: internet for a "
        "networked VM, none for one without a NIC",
    )
    user_data: str | None = Field(
        default=None,
        max_length=65536,
        description="a shell script starting with #! (run at every boot) or #cloud-config "
        "YAML; at most 64 KiB of UTF-8, no NUL",
    )
    boot_args: str | None = Field(
        default=None,
        max_length=1024,
        description="extra kernel parameters: printable ASCII words; hatch.* are reserved",
    )
    restart: Literal["no", "on-failure"] = Field(
        default="no", description="on-failure: cold-boot the VM again after a crash"
    )

    @field_validator("boot_args")
    @classmethod
    def _boot_args(cls, value: str | None) -> str | None:
        if value is None:
            return None
        words = value.split()
        for word in words:
            if not _BOOT_ARG.match(word):
                raise ValueError("must be printable ASCII kernel parameters")
            if word.startswith("hatch."):
                raise ValueError(f"{word.split('=')[0]} is set by hatchd and cannot be given")
        return " ".join(words) or None

    @field_validator("egress")
    @classmethod
    def _egress_needs_network(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value == Egress.INTERNET and info.data.get("enable_network") is False:
            raise ValueError("internet needs a network (enable_network is false)")
        return value

    @property
    def egress_or_default(self) -> Egress:
        if self.egress is not None:
            return Egress(self.egress)
        return Egress.INTERNET if self.enable_network else Egress.NONE


class RestoreRequest(StrictInput):
    snapshot_id: str | None = Field(
        default=None, min_length=1, max_length=64, description="default: the latest snapshot"
    )


class RouteCreate(StrictInput):
    subdomain: Annotated[str, WithJsonSchema(_SUBDOMAIN_SCHEMA)] | None = Field(
        default=None, description="default: 12 random lowercase letters and digits"
    )
    target_port: int = Field(ge=1, le=65535)
    auto_wake: bool = True

    @field_validator("subdomain")
    @classmethod
    def _subdomain(cls, value: str | None) -> str | None:
        if value is not None and (problem := subdomain_problem(value)):
            raise ValueError(problem)
        return value


INPUT_MODELS: tuple[type[BaseModel], ...] = (VMCreate, RestoreRequest, RouteCreate)
