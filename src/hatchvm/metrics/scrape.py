"""One scrape: figures read at scrape time (VMs by state, from the database), then the text."""

from __future__ import annotations

from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from sqlalchemy.ext.asyncio import async_sessionmaker

from hatchvm.db import repo
from hatchvm.metrics.figures import Metrics

log = structlog.get_logger("hatchvm.metrics")

# Prometheus's text exposition format 0.0.4, which every scraper reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class Scrape:
    def __init__(self, metrics: Metrics, sessions: async_sessionmaker[Any]) -> None:
        self.metrics = metrics
        self.sessions = sessions

    async def render(self) -> bytes:
        """The exposition text. Runs on the event loop, like the proxy that writes its
        request counts there (metrics/requests.py): nothing is read half-written."""
        try:
            async with self.sessions() as session:
                counts: dict[str, int] | None = await repo.vms_by_state(session)
        except Exception as exc:  # the rest is worth having when the database is away
            log.warning("vm states not counted for metrics", reason=str(exc) or repr(exc))
            counts = None
        self.metrics.set_vm_states(counts)
        return generate_latest(self.metrics.registry)
