"""Shared fixtures: a real S3 protocol server (moto) on 127.0.0.1."""
from __future__ import annotations

import boto3
import pytest

BUCKET = "memflow-test"
# Dummy, but shaped like a real secret so tests can check that it never leaks.
SECRET_KEY = "dummySecretKey/DoNotLeak+0123456789abcdef"


@pytest.fixture(scope="session")
def s3_server():
    """Start moto in server mode on a free loopback port; yield its endpoint URL.

    Credentials are dummies set in the environment only while the fixture is
    alive, with config files pointed away so a developer's real profile is never used."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                     "MEMFLOW_S3_ENDPOINT"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", "/dev/null")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_server) -> str:
    """The bucket that `s3_server` created."""
    return BUCKET
