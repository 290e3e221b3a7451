"""hatchd raises its soft open-file limit to the hard one at start-up."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
from hatchvm.daemon import raise_open_file_limit
raised = raise_open_file_limit()
now = resource.getrlimit(resource.RLIMIT_NOFILE)
print(raised, now[0], now[1])
"""


def test_soft_limit_goes_up_to_the_hard_one() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    raised, soft, hard = out.stdout.splitlines()[-1].split()  # after the log line
    assert int(raised) == int(soft) > 256
    assert soft == hard or hard == str(2**64 - 1)  # RLIM_INFINITY: up to fs.nr_open
