"""The environment a VMM process is started with."""

import os

# A guest that escapes lands in its VMM: nothing of hatchd's environment it could leak
# (S3 and auth secrets live there) goes along, just enough to find programs and format text.
KEPT = ("PATH", "LANG", "LC_ALL", "TZ")


def vmm_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in KEPT}
