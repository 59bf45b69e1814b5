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


@pytest.fixture(scope="session")
def ray_head():
    """A private Ray head on 127.0.0.1 (tests/ray_cluster.py), 4 CPUs, for the whole session.

    While it lives, this process's environment carries its auth settings and no
    RAY_ADDRESS of anyone else's, and Ray in this process keeps to 127.0.0.1, so
    `ray.init(address=ray_head.gcs_address)` and the Jobs SDK reach it."""
    from ray._private import ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state

    from tests.ray_cluster import start_head

    head = start_head(num_cpus=4)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("RAY_ADDRESS", raising=False)
            for name, value in head.client_env.items():
                mp.setenv(name, value)
            # Both read from the environment when Ray was imported: refresh them.
            mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
            reset_auth_token_state()
            yield head
        reset_auth_token_state()
    finally:
        head.stop()


@pytest.fixture
def ray_client(ray_head):
    """This process connected to `ray_head` as a driver; disconnected after the test."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=ray_head.gcs_address, log_to_driver=False)
    try:
        yield ray_head
    finally:
        ray.shutdown()
