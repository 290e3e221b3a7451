"""The proxy's requests: a latency histogram by status class and origin, kept in plain lists.

This is the proxy's hot path (tens of thousands of requests a second on one loop). A
prometheus_client Histogram takes a lock per observation and finds its labelled child in a
dict; here an observation is an index, a bisect and two additions. Only the event loop writes,
and the scrape runs on the same loop (api/metrics.py), so nothing is read half-written.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import accumulate

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

NAME = "hatch_proxy_request_duration_seconds"
DOC = (
    "Requests through the proxy, from their head to the end of their answer, by the answer's "
    "status class and who gave it (guest, or proxy: no route, wake failed, timeout, malformed); "
    'status_class="none": the client left before any answer'
)
ORIGINS = ("guest", "proxy")
# Index = status // 100: 0 is "no answer"; a guest may send any three-digit status.
CLASSES = ("none", *(f"{n}xx" for n in range(1, 10)))


class RequestStats(Collector):
    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = sorted(buckets)
        width = len(self.bounds) + 1  # the last slot is +Inf
        # One row per (class, origin): slot = class * 2 + (1 if the proxy answered).
        self._counts = [[0] * width for _ in range(len(CLASSES) * 2)]
        self._sums = [0.0] * (len(CLASSES) * 2)

    def observe(self, status: int, by_proxy: bool, seconds: float) -> None:
        slot = status // 100 % 10 * 2 + by_proxy
        self._counts[slot][bisect_left(self.bounds, seconds)] += 1
        self._sums[slot] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(NAME, DOC, labels=["status_class", "origin"])
        bounds = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for slot, counts in enumerate(self._counts):
            if not any(counts):  # a series appears with its first request
                continue
            cumulative = list(accumulate(counts))
            family.add_metric(
                [CLASSES[slot // 2], ORIGINS[slot % 2]],
                list(zip(bounds, cumulative, strict=True)),
                self._sums[slot],
            )
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(NAME, DOC, labels=["status_class", "origin"])
