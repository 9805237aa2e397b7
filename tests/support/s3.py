"""A real S3 API on a loopback port: moto's server mode as a subprocess.

Tests talk to it over HTTP exactly as the mirror talks to AWS, MinIO or Ceph;
nothing patches the client. One server per test session; each test makes its
own bucket, so tests never see each other's objects.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.support.net import free_port, wait_http

ACCESS_KEY = "mirror-test-key"
SECRET_KEY = "mirror-test-secret"  # moto accepts any pair; these only prove they are passed
REGION = "us-east-1"
_names = itertools.count()


class MotoS3:
    """``python -m moto.server`` on 127.0.0.1, stopped by PID.

    Args:
        workdir: folder for the server's log.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / "moto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the endpoint_url for clients."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (to stop it for a while, as a fault)."""
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_http(f"{self.url}/moto-api/", timeout=timeout)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the server (by its PID) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def client(self) -> Any:
        """A synchronous boto3 S3 client of this server (for set-up and checks)."""
        return boto3.client(
            "s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, proxies={}))

    def new_bucket(self, stem: str = "mirror") -> str:
        """Create a bucket with a name no other test uses and return the name."""
        name = f"{stem}-{next(_names)}-{self.port}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def get(self, bucket: str, key: str) -> bytes:
        """An object's bytes."""
        body: bytes = self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return body


def credential_files(folder: Path) -> dict[str, str]:
    """The ``storage.s3`` keys that read this server's credentials from files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "s3-key-id").write_text(ACCESS_KEY + "\n")
    (folder / "s3-secret").write_text(SECRET_KEY + "\n")
    return {"access_key_id_file": str(folder / "s3-key-id"),
            "secret_access_key_file": str(folder / "s3-secret")}


def s3_config(server: MotoS3, bucket: str, folder: Path, **extra: Any) -> dict[str, Any]:
    """A ``storage.s3`` section for a mirror using ``bucket`` on ``server``."""
    return {"bucket": bucket, "endpoint_url": server.url, "region": REGION,
            **credential_files(folder), **extra}
