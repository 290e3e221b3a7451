"""Property-based tests of the whole API against its own /openapi.json (schemathesis).

Every operation gets generated requests, valid and invalid, from a fixed seed; every answer must
be one the document lists for that operation (status, content type, schema), none may be a 5xx,
and hatchd must still answer afterwards. Generated VM creates boot real VMs: the quota (2) keeps
them few. Two runs, each as its own user so each starts with a free quota: the per-operation
phases (examples, coverage, fuzzing), then the stateful phase, which follows the document's
links (create a VM, stop it, snapshot it, restore it...).

HATCH_FUZZ_SEED and HATCH_FUZZ_EXAMPLES size the run; scripts/fuzz-api runs a longer one."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.vm

SEED = int(os.environ.get("HATCH_FUZZ_SEED", "20260306"))
EXAMPLES = int(os.environ.get("HATCH_FUZZ_EXAMPLES", "40"))  # per operation and phase
MIN_CASES = int(os.environ.get("HATCH_FUZZ_MIN_CASES", "500"))
OPERATIONS = 32  # every operation in the document...
# ... but those whose answer may rightly never end: a generated command may run until its
# timeout_s (up to a day), and the console with follow=true streams for as long as the VM runs
# (a generated request held the run for good). tests/integration/test_exec_files.py and the
# console's tests cover them; tests/unit/test_openapi.py checks their documented inputs.
UNENDING = ("exec_vm", "exec_vm_stream", "get_console")

# Everything schemathesis checks except positive_data_acceptance: the document cannot promise
# that a well-formed request succeeds (a random id is 404, the quota 403, user_data must be a
# script or cloud-config), only that the answer is one it lists.
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
]

# Positive control: the run reached real resources, not only 404s for made-up ids. (Whether a
# stop, start or restore also succeeds depends on the path a seed takes: with a quota of 2, the
# VMs are often asleep when those come.)
MUST_SUCCEED = {
    ("POST", "/vms"),
    ("GET", "/vms/{id}"),
    ("POST", "/vms/{id}/snapshot"),
    ("GET", "/snapshots/{id}"),
    ("POST", "/vms/{id}/routes"),
    ("DELETE", "/vms/{id}"),
}


@dataclass
class Run:
    report: dict
    statuses: collections.Counter[tuple[str, str, int]]
    output: str


@pytest.fixture
def hatch(daemon_factory):
    d = daemon_factory(
        HATCH_MAX_VMS_PER_USER="2",
        HATCH_MAX_SNAPSHOTS_PER_VM="2",
        HATCH_VM_DISK_MIB="64",  # the smallest disk: faster creates, smaller snapshots
        HATCH_STOP_TIMEOUT="5",  # a guest still booting ignores the power button
    )
    d.start()
    return d


def operation_of(method: str, url: str) -> tuple[str, str]:
    path = re.sub(r"^https?://[^/]+", "", url).split("?")[0]
    return method, re.sub(r"/(vms|snapshots|routes|images)/[^/]+", r"/\1/{id}", path)


def schemathesis(hatch, key: str, phases: str, workdir: Path) -> Run:
    workdir.mkdir()
    report, har = workdir / "report.json", workdir / "requests.har"
    cmd = [
        *(sys.executable, "-m", "schemathesis.cli", "run", f"{hatch.url}/openapi.json"),
        *("--header", f"Authorization: Bearer {key}"),
        *("--phases", phases, "--checks", ",".join(CHECKS), "--continue-on-failure"),
        *(arg for op in UNENDING for arg in ("--exclude-operation-id", op)),
        *("--seed", str(SEED), "--max-examples", str(EXAMPLES), "--workers", "1"),
        *("--request-timeout", "300", "--report", "json,har"),
        *("--report-json-path", str(report), "--report-har-path", str(har)),
    ]
    # The working directory holds schemathesis' crash cache: a fresh one makes runs repeatable.
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=1800)
    assert report.exists(), proc.stdout[-5000:] + proc.stderr[-5000:]
    statuses: collections.Counter[tuple[str, str, int]] = collections.Counter()
    for entry in json.loads(har.read_text())["log"]["entries"]:
        method, path = operation_of(entry["request"]["method"], entry["request"]["url"])
        statuses[(method, path, entry["response"]["status"])] += 1
    return Run(json.loads(report.read_text()), statuses, proc.stdout)


@pytest.mark.postgres
def test_api_against_its_own_document(hatch, tmp_path: Path) -> None:
    per_operation = schemathesis(
        hatch, hatch.create_key("fuzzer"), "examples,coverage,fuzzing", tmp_path / "operations"
    )
    stateful = schemathesis(hatch, hatch.create_key("stateful"), "stateful", tmp_path / "stateful")
    runs = (per_operation, stateful)
    statuses = per_operation.statuses + stateful.statuses
    print(per_operation.output[-3000:], stateful.output[-3000:], sep="\n")
    for (method, path, status), count in sorted(statuses.items()):
        print(f"{method:7} {path:24} {status} x{count}")

    for run in runs:
        assert run.report["failures"] == [], run.output[-20000:]
        assert run.report["errors"] == [], run.output[-20000:]
        assert run.report["exit_code"] == 0, run.output[-5000:]
    assert per_operation.report["operations"]["tested"] == OPERATIONS - len(UNENDING)
    cases = sum(run.report["test_cases"]["generated"] for run in runs)
    seconds = sum(run.report["running_time"] for run in runs)
    print(f"{cases} generated cases, {sum(statuses.values())} requests in {seconds:.0f}s")
    assert cases >= MIN_CASES
    assert not [s for s in statuses if s[2] >= 500]
    succeeded = {(method, path) for method, path, status in statuses if status < 300}
    assert MUST_SUCCEED <= succeeded, MUST_SUCCEED - succeeded

    # hatchd is still alive and answering.
    assert hatch.proc.poll() is None
    health = httpx.get(hatch.url + "/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
