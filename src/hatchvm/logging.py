"""One logger for everything hatchd prints: structlog's own events and the standard-library
loggers of the libraries (Alembic, uvicorn, ...) go through the same processors and the same
handler on stderr, so stdout stays free for a command's output.

Readable lines on a terminal, JSON lines otherwise (or as HATCH_LOG_FORMAT says)."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "console", "json"]

# Their debug output drowns ours; their warnings still show.
_NOISY = ("pyroute2", "aiosqlite", "qemu.qmp", "botocore", "boto3", "s3transfer", "urllib3")


def _renderer(fmt: LogFormat) -> structlog.typing.Processor:
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    if console:
        return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    return structlog.processors.JSONRenderer()


def configure_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _renderer(fmt),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    # uvicorn and Alembic install handlers of their own when left alone: route them to root.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "alembic"):
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
