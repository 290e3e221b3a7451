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

from hatchvm.agent.exec import Command
from hatchvm.core.forks import MAX_FORK_COUNT
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


class ForkRequest(StrictInput):
    count: int = Field(
        default=1,
        ge=1,
        le=MAX_FORK_COUNT,
        description="how many new VMs (each one counts in the caller's quotas)",
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


DEFAULT_EXEC_TIMEOUT_S = 60.0  # of a command waited for
MAX_EXEC_TIMEOUT_S = 86400.0
MAX_COMMAND_BYTES = 60 << 10  # cmd, env and cwd travel in one 64 KiB frame to the guest
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


class ExecRequest(StrictInput):
    cmd: list[str] | str = Field(
        description="argv (the program is looked up in PATH), or a string run by /bin/sh -c"
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="added to the base environment (PATH, HOME=/root, USER, LOGNAME, SHELL)",
    )
    cwd: str | None = Field(
        default=None, max_length=4096, description="absolute path; default /root"
    )
    stdin: str | None = Field(default=None, description="fed to the command (UTF-8)")
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_EXEC_TIMEOUT_S,
        description="the command and its process group are killed after this long; default "
        f"{DEFAULT_EXEC_TIMEOUT_S:g} s, or no limit for a background process",
    )
    background: bool = Field(
        default=False,
        description="start it and answer 201 with the process at once (stdin not allowed)",
    )

    @field_validator("cmd")
    @classmethod
    def _cmd(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("must not be empty")
            return _no_nul(value)
        if not value or not value[0]:
            raise ValueError("must name a program")
        for arg in value:
            _no_nul(arg)
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name[:40]!r} is not a variable name")
            _no_nul(text)
        return value

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return None if value is None else _no_nul(value)

    @field_validator("background")
    @classmethod
    def _background(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("stdin") is not None:
            raise ValueError("a background process reads no stdin")
        return value

    @property
    def argv(self) -> tuple[str, ...]:
        return ("/bin/sh", "-c", self.cmd) if isinstance(self.cmd, str) else tuple(self.cmd)

    def command(self) -> Command:
        """What the agent runs; ValueError when it does not fit in one request."""
        size = sum(len(a.encode()) + 6 for a in self.argv)
        size += sum(len(k.encode()) + len(v.encode()) + 7 for k, v in self.env.items())
        size += len((self.cwd or "").encode())
        if size > MAX_COMMAND_BYTES:
            raise ValueError(f"cmd, env and cwd take {size} bytes; at most {MAX_COMMAND_BYTES}")
        timeout = self.timeout_s
        if timeout is None and not self.background:
            timeout = DEFAULT_EXEC_TIMEOUT_S
        return Command(
            argv=self.argv,
            env=tuple(self.env.items()),
            cwd=self.cwd,
            stdin=None if self.stdin is None else self.stdin.encode(),
            timeout_s=timeout,
        )


SIGNALS = {"HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "USR1": 10, "USR2": 12, "TERM": 15}


class KillRequest(StrictInput):
    signal: Literal["HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM"] = Field(
        default="TERM", description="sent to the process's group"
    )


INPUT_MODELS: tuple[type[BaseModel], ...] = (
    VMCreate,
    RestoreRequest,
    ForkRequest,
    RouteCreate,
    ExecRequest,
    KillRequest,
)
