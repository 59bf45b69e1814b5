"""Shared fixtures: a real S3 protocol server (moto) on 127.0.0.1, a private Ray head for
the session (`ray_head`, `ray_client`), and a multi-node Ray cluster (`ray_cluster`)."""
from __future__ import annotations

import os
import signal
import threading

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


class HeadWatch(threading.Thread):
    """Ends the test session at once, with the reason, if the session's Ray head dies.

    Without it the test that was running blocks in a Ray call until Ray gives up (a
    minute, then it kills this process without a word), and a test in a subprocess or
    a Jobs CLI call waits out its own timeout. `ray start --block` exits when any of
    the head's processes dies; this thread waits for that, then interrupts the main
    thread (SIGUSR1, whose handler raises KeyboardInterrupt: Ray's blocking calls give
    way to that), and pytest_sessionfinish turns the interruption into the reason and
    exit status 3."""

    died: str | None = None  # why the session stopped, once it has

    def __init__(self, head):
        super().__init__(daemon=True, name="ray-head-watch")
        self.head, self.stopping = head, False
        self.previous = signal.signal(signal.SIGUSR1, self._interrupt)

    def run(self):
        code = self.head.process.wait()
        if self.stopping:
            return
        log = self.head.log.read_text(errors="replace")[-2000:] if self.head.log.exists() else ""
        HeadWatch.died = (f"the test session's Ray head died (`ray start` exited with {code}; its logs are in "
                          f"{self.head.temp_dir}/session_latest/logs); the tests that need it cannot go on.\n"
                          f"last lines of `ray start`:\n{log}")
        os.kill(os.getpid(), signal.SIGUSR1)

    @staticmethod
    def _interrupt(signum, frame):
        if HeadWatch.died is not None:
            raise KeyboardInterrupt(HeadWatch.died)

    def stop(self):
        self.stopping = True
        signal.signal(signal.SIGUSR1, self.previous)


def pytest_sessionfinish(session, exitstatus):
    if HeadWatch.died is not None:
        session.config.get_terminal_writer().line(f"\nSTOPPED: {HeadWatch.died}", red=True, bold=True)
        session.exitstatus = 3


@pytest.fixture(scope="session")
def ray_head(s3_server):
    """A private Ray head on 127.0.0.1 (tests/ray_cluster.py), 4 CPUs, for the whole session.

    Its processes have the session's object storage credentials in their environment
    (as a node with a secret env or instance role): replicas use those, not the
    driver's. While it lives, this process's environment carries its auth settings and no
    RAY_ADDRESS of anyone else's, and Ray in this process keeps to 127.0.0.1, so
    `ray.init(address=ray_head.gcs_address)` and the Jobs SDK reach it. If it dies, the
    session ends at once with the reason (HeadWatch)."""
    from ray._private import ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state

    from tests.ray_cluster import node_credentials, start_head

    head = start_head(num_cpus=4, node_env=node_credentials())
    watch = HeadWatch(head)
    watch.start()
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
        watch.stop()
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


@pytest.fixture
def ray_cluster(ray_head, monkeypatch):
    """A multi-node cluster of its own (tests/ray_cluster.py LocalCluster: a head and
    worker nodes added by the test, each with one `fake_gpu`), this process its driver."""
    import ray

    from tests.ray_cluster import LocalCluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = LocalCluster()
    try:
        monkeypatch.setenv("RAY_TMPDIR", str(cluster.temp_dir))
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
