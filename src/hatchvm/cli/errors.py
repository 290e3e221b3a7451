"""Turn every expected failure into one line on stderr and exit status 1."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from hatchvm.cli.output import print_error
from hatchvm.client import HatchAPIError
from hatchvm.config import ConfigError
from hatchvm.errors import HatchError
from hatchvm.images.errors import ImageError

P = ParamSpec("P")
R = TypeVar("R")

EXPECTED = (HatchAPIError, HatchError, ConfigError, ImageError, OSError)


def one_line(exc: BaseException) -> str:
    if isinstance(exc, HatchError | ImageError):
        return exc.message
    if isinstance(exc, HatchAPIError) and exc.status:
        return f"{exc.message} (HTTP {exc.status})"
    return " ".join(str(exc).split()) or type(exc).__name__


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorator for CLI commands: known errors become `error: ...` and exit code 1."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except EXPECTED as exc:
            print_error(one_line(exc))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(130) from None

    return run
