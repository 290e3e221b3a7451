"""Artifacts in an S3 bucket (HATCH_S3_BUCKET). boto3 is blocking: every call runs in a thread;
uploads and downloads are multipart and parallel through boto3's transfer manager."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from hatchvm.snapshots.errors import ArtifactError, ArtifactMissing

T = TypeVar("T")

KEY_PREFIX = "snapshots/"
TRANSFER = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20)
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


class S3Store:
    backend = "s3"

    def __init__(
        self,
        bucket: str,
        endpoint: str = "",
        region: str = "us-east-1",
        access_key: str = "",
        secret_key: str = "",
    ) -> None:
        self.bucket = bucket
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=region,
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=32,  # a restore fetches ranges of packs in parallel
            ),
        )

    def location(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{KEY_PREFIX}{prefix}"

    async def _call(self, what: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(func, *args, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                raise ArtifactMissing(f"{what}: not found in s3://{self.bucket}") from None
            raise ArtifactError(f"{what}: S3 error {code or exc}") from None
        except (BotoCoreError, OSError) as exc:
            raise ArtifactError(f"{what}: {exc}") from None

    async def put(self, key: str, path: Path) -> None:
        await self._call(
            key, self._client.upload_file, str(path), self.bucket, KEY_PREFIX + key, Config=TRANSFER
        )
        path.unlink(missing_ok=True)

    async def fetch(self, key: str, workdir: Path) -> Path:
        dest = workdir / key.replace("/", "_")
        await self._call(
            key, self._client.download_file, self.bucket, KEY_PREFIX + key, str(dest),
            Config=TRANSFER,
        )  # fmt: skip
        return dest

    async def delete_prefix(self, prefix: str) -> None:
        await self._call(prefix, self._delete_prefix, KEY_PREFIX + prefix.rstrip("/") + "/")

    def _delete_prefix(self, prefix: str) -> None:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    # ---- blobs (the chunk store): blocking, called from the chunk store's threads ---------

    def _sync(self, what: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return func(*args, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                raise ArtifactMissing(f"{what} is missing from s3://{self.bucket}") from None
            raise ArtifactError(f"{what}: S3 error {code or exc}") from None
        except (BotoCoreError, OSError) as exc:
            raise ArtifactError(f"{what}: {exc}") from None

    def write_blob(self, key: str, data: bytes) -> None:
        self._sync(
            key, self._client.put_object, Bucket=self.bucket, Key=KEY_PREFIX + key, Body=data
        )

    def read_blob(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            return b""
        end = "" if length is None else str(start + length - 1)
        answer = self._sync(
            key,
            self._client.get_object,
            Bucket=self.bucket,
            Key=KEY_PREFIX + key,
            Range=f"bytes={start}-{end}",
        )
        return self._sync(key, answer["Body"].read)

    def list_blobs(self, prefix: str) -> list[tuple[str, int]]:
        def run() -> list[tuple[str, int]]:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=KEY_PREFIX + prefix
            )
            return [
                (obj["Key"][len(KEY_PREFIX) :], int(obj["Size"]))
                for page in pages
                for obj in page.get("Contents", [])
            ]

        return self._sync(prefix, run)

    def delete_blobs(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # the most one request may name
            batch = [{"Key": KEY_PREFIX + k} for k in keys[i : i + 1000]]
            self._sync(
                "delete", self._client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch}
            )

    async def check(self) -> None:
        """Fail early (at daemon start) when the bucket cannot be reached."""
        await self._call("bucket", self._client.head_bucket, Bucket=self.bucket)
