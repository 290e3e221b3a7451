"""What hatchd measures, exposed for Prometheus at GET /metrics.

`Metrics` (figures.py) is built once in daemon.py and handed to the parts that record; each part
calls one method per event. The proxy's per-request figures are kept in plain counters on the
event loop (requests.py) rather than in prometheus_client's locked ones: they sit on its hot
path. VM states are counted from the database when scraped (scrape.py). No label names a VM, a
user or a subdomain, so the number of series stays bounded however many there are.
"""

from hatchvm.metrics.figures import Metrics

__all__ = ["Metrics"]
