"""A real S3-compatible server for the object-store tests: moto's standalone server in a subprocess on
127.0.0.1 (never a client mock), with authentication on, so that wrong credentials are refused.

The server accepts its first ``INITIAL_NO_AUTH_ACTION_COUNT`` requests unsigned: they create an IAM
user allowed everything and its key; every later request must be signed with that key.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

pytest.importorskip("moto", reason="the object-store tests need moto[server] (the 'dev' extra)")
pytest.importorskip("obstore", reason="object-store pools need obstore (the 's3' extra)")

BUCKET = "xal-pools"


@dataclass(frozen=True)
class S3:
    endpoint: str
    key: str
    secret: str
    bucket: str = BUCKET

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def client(self):  # a boto3 S3 client
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        """Every key in the bucket under ``prefix`` (sorted)."""
        keys: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client().delete_object(Bucket=self.bucket, Key=key)


_LAUNCH = ("import subprocess, sys; print(subprocess.Popen(sys.argv[1:], start_new_session=True, "
           "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3]:
    import boto3

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    # Started through a launcher that exits at once, so the server is not a descendant of this process:
    # `score --backend ray` reaps every descendant of its driver (this process) when it ends.
    launched = subprocess.run([sys.executable, "-c", _LAUNCH, sys.executable, "-m", "moto.server",
                               "-H", "127.0.0.1", "-p", str(port)],
                              env=env, capture_output=True, text=True, check=True, timeout=60)
    pid = int(launched.stdout)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if not _alive(pid) or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap", region_name="us-east-1")
        iam.create_user(UserName="xal")
        key = iam.create_access_key(UserName="xal")["AccessKey"]
        iam.put_user_policy(UserName="xal", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        server = S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=server.key,
                     aws_secret_access_key=server.secret, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield server
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def s3(s3_server: S3) -> Iterator[S3]:
    """The server, with its credentials and endpoint in this process's environment (as a user sets them);
    subprocesses and Ray workers started meanwhile inherit them."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("AWS_")] + ["XAL_STORAGE_OPTIONS"]:
            mp.delenv(name, raising=False)
        for name, value in s3_server.env().items():
            mp.setenv(name, value)
        yield s3_server
