"""A private Ray head on 127.0.0.1 for tests, started and stopped by its own processes.

`ray stop` is not used: it terminates every Ray process on the machine, including
heads that other people or other test sessions started. Instead the head runs as
`ray start --head --block` in a session of its own with its own temp dir, ports
and auth token; stopping it sends SIGTERM to that `ray start` (which shuts its
node down), then SIGKILLs what is left in its session or names its temp dir.

On Linux Ray swaps `--node-ip-address=127.0.0.1` for the machine's address and then
listens on every interface; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (single node, as on
macOS) keeps everything on 127.0.0.1. A driver connecting with `ray.init` needs the
same setting, which Ray reads when imported (conftest's `ray_head` patches it).

The head's processes get no object storage endpoint or credentials: like nodes
without a cloud role, they rely on what the driver forwards.

Token authentication (Ray's default when ~/.ray/auth_token exists) stays on, with
a token of the head's own (RAY_AUTH_TOKEN_PATH in its temp dir): the CLI, the Jobs
API and `ray.init` all read it from the environment that `RayHead.env` describes.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from cluster.storage import STORAGE_ENV

# Everything a client of the head needs in its environment (and nothing of another head's).
_DROP_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_JOB_CONFIG_JSON_ENV_VAR")


_CLIENT_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    temp_dir: Path
    gcs_address: str  # host:port, for ray.init(address=...)
    dashboard_url: str  # http://host:port, for the Jobs CLI/SDK
    env: dict  # environment for clients: auth mode and token path, no foreign RAY_ADDRESS
    process: subprocess.Popen = field(repr=False)
    log: Path = field(repr=False)

    @property
    def client_env(self) -> dict:
        """Only the variables that differ from os.environ's for a client (see `env`)."""
        return {k: v for k, v in self.env.items() if k in _CLIENT_ENV}

    def job_cli(self, *args: str, timeout: float = 300, cwd: str | os.PathLike | None = None
                ) -> subprocess.CompletedProcess:
        """`ray job <args> --address <dashboard>`, output captured, bounded by `timeout`."""
        cmd = [str(Path(sys.executable).with_name("ray")), "job", args[0], "--address", self.dashboard_url, *args[1:]]
        return subprocess.run(cmd, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)

    def stop(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # ray start --block: drains and shuts its node down
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # start_new_session: its group is ours alone
        except ProcessLookupError:
            pass
        self.process.wait(10)
        stragglers = _processes_of(self.process.pid, str(self.temp_dir))
        for p in stragglers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(stragglers, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _processes_of(session: int, temp_dir: str) -> list[psutil.Process]:
    """Processes in the head's session (Ray's agents rename themselves, `ray::...`) or
    naming its temp dir on their command line."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and (os.getsid(p.pid) == session
                                         or any(temp_dir in arg for arg in p.info["cmdline"] or ())):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
            continue
    return found


def start_head(num_cpus: int = 4, timeout: float = 120) -> RayHead:
    """Start a head on 127.0.0.1 with free ports; return once its Jobs API answers."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's unix sockets live under it
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    # No object storage credentials or endpoint of its own (as on nodes without a cloud role):
    # what the replicas need must come from the driver.
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV and k not in STORAGE_ENV}
    env.update(AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_EC2_METADATA_DISABLED="true")
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # single node: Ray keeps 127.0.0.1, not the host's IP
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    gcs_port, dash_port, client_port, agent_port, *metric_ports = (free_port() for _ in range(6))
    # Fixed by default (10001, 52365, 44217, 44227): chosen here so that heads can run side by side.
    env.update(AUTOSCALER_METRIC_PORT=str(metric_ports[0]), DASHBOARD_METRIC_PORT=str(metric_ports[1]))
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
           f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
           f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    log = temp_dir / "ray-start.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    head = RayHead(temp_dir, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", env, process, log)
    try:
        _wait_for_jobs_api(head, token_path.read_text(), timeout)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_for_jobs_api(head: RayHead, token: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{head.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    last = "no answer yet"
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.process.returncode}:\n{head.log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200 and isinstance(json.loads(r.read()), list):
                    return
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"the Jobs API at {head.dashboard_url} did not answer in {timeout:.0f} s ({last}):\n"
                       f"{head.log.read_text()[-4000:]}")
