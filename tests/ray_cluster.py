"""Private Ray clusters on 127.0.0.1 for tests, started and stopped by their own processes:
a head (`start_head`) for most tests, and several raylets (`LocalCluster`) where nodes
must join and leave mid-run.

`ray stop` is not used: it terminates every Ray process on the machine, including
heads that other people or other test sessions started. Instead the head runs as
`ray start --head --block` in a session of its own with its own temp dir, ports
and auth token; stopping it sends SIGTERM to that `ray start` (which shuts its
node down), then SIGKILLs what is left in its session or names its temp dir.

On Linux Ray swaps `--node-ip-address=127.0.0.1` for the machine's address and then
listens on every interface; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (single node, as on
macOS) keeps everything on 127.0.0.1. A driver connecting with `ray.init` needs the
same setting, which Ray reads when imported (conftest's `ray_head` patches it).

The head's processes get the object storage credentials the test session has (like a
node with an instance role or a secret env): replicas use their node's credentials,
never the driver's. The endpoint is configuration, which the driver passes on.

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
import contextlib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from cluster.storage import S3_ENDPOINT_ENV, STORAGE_ENV

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


def start_head(num_cpus: int = 4, timeout: float = 120, node_env: dict | None = None, attempts: int = 3) -> RayHead:
    """Start a head on 127.0.0.1 with free ports; return once its Jobs API answers and all
    its processes are up. `node_env`: what the node's processes get besides (credentials,
    as a node's secret env).

    The ports are chosen free here, then bound by Ray's processes a moment later, while Ray
    picks more ports of its own from the same range: rarely, one of those takes one of ours
    and a process of the head dies on its bind. That start is thrown away and another made
    with new ports, `attempts` times at most."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_head_once(num_cpus, timeout, node_env)
        except PortTaken:
            if attempt == attempts:
                raise


class PortTaken(RuntimeError):
    """A process of the head could not bind a port chosen for it."""


_BIND_FAILED = ("address already in use", "failed to bind")  # as Ray and gRPC say it, lower case


def _start_head_once(num_cpus: int, timeout: float, node_env: dict | None) -> RayHead:
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's unix sockets live under it
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    # Object storage credentials only from `node_env` (the node's own), never a developer's profile.
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV and k not in STORAGE_ENV}
    env.update(AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_EC2_METADATA_DISABLED="true")
    env.update(node_env or {})
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
        _wait_listening(head, {gcs_port, dash_port, client_port, agent_port}, timeout)
    except BaseException as e:
        died, text = head.process.poll(), log.read_text(errors="replace") if log.exists() else ""
        head.stop()
        if died is not None and any(m in text.lower() for m in _BIND_FAILED) and isinstance(e, RuntimeError):
            raise PortTaken(text[-4000:]) from e
        raise
    return head


def _wait_listening(head: RayHead, ports: set[int], timeout: float) -> None:
    """Wait until processes of the head listen on all of `ports`: some (the Ray Client
    server, the agents) bind theirs after the Jobs API answers, and one that finds its
    port taken dies, and `ray start --block` with it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.process.returncode}:\n{head.log.read_text()[-4000:]}")
        listening = set()
        for p in _processes_of(head.process.pid, str(head.temp_dir)):
            with contextlib.suppress(psutil.Error):
                listening |= {c.laddr.port for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        if ports <= listening:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the head did not listen on ports {sorted(ports - listening)} in {timeout:.0f} s:\n"
                       f"{head.log.read_text()[-4000:]}")


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


def node_credentials() -> dict:
    """The object storage credentials of this process (the session's moto dummies), as a
    node's secret env would carry them; no endpoint (the driver passes that on)."""
    return {k: os.environ[k] for k in STORAGE_ENV if k not in S3_ENDPOINT_ENV and os.environ.get(k)}


@contextlib.contextmanager
def _environ(changes: dict):
    """os.environ with `changes` (None: unset) while a node's processes are spawned: they inherit it."""
    saved = dict(os.environ)
    try:
        for k, v in changes.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class LocalCluster:
    """Several raylets on this machine (ray.cluster_utils.Cluster), all on 127.0.0.1, in a
    temp dir of their own, for tests where nodes join and leave mid-run.

    Worker nodes carry RESOURCE, which stands in for a GPU: replicas ask for it
    (`--replica-resources`), so they can only run on worker nodes and move between them
    as nodes come and go. Each node's processes inherit the environment given to
    `add_node` (with or without credentials, a faulty node, ...); the head has none of
    the object storage variables. Nothing here runs `ray stop`: nodes are removed one by one.
    """

    RESOURCE = "fake_gpu"

    def __init__(self, head_cpus: int = 2):
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        # This process starts the nodes and drives them: it keeps to 127.0.0.1 too (Ray read
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it was imported, so set what it derived).
        self._cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: unix socket paths
        (self.temp_dir / "ray").mkdir()
        # RAY_TMPDIR: the cluster's address file goes here, not to the shared /tmp/ray.
        self.env = {"RAY_TMPDIR": str(self.temp_dir), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "RAY_USAGE_STATS_ENABLED": "0", "AUTOSCALER_METRIC_PORT": str(free_port()),
                    "DASHBOARD_METRIC_PORT": str(free_port())}
        with _environ({**self.env, **{k: None for k in STORAGE_ENV}}):
            self.cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args=dict(
                num_cpus=head_cpus, node_ip_address="127.0.0.1", temp_dir=str(self.temp_dir),
                include_dashboard=False, dashboard_agent_listen_port=free_port()))
        self.address = self.cluster.address

    def add_node(self, gpus: int = 1, cpus: int = 1, env: dict | None = None, wait: bool = True):
        """A worker node with `gpus` of RESOURCE; `env` changes its processes' environment."""
        with _environ({**self.env, **(env or {})}):
            return self.cluster.add_node(num_cpus=cpus, resources={self.RESOURCE: gpus} if gpus else {},
                                         node_ip_address="127.0.0.1", temp_dir=str(self.temp_dir), wait=wait)

    def remove_node(self, node) -> None:
        """Every process of the node is killed at once, as when a spot instance is reclaimed:
        its Ray processes, and the workers (actors) they started, which Ray would otherwise
        let finish what they are doing."""
        workers = []
        for info in (p for procs in node.all_processes.values() for p in procs):
            with contextlib.suppress(psutil.NoSuchProcess):
                workers += psutil.Process(info.process.pid).children(recursive=True)
        for p in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with _environ(self.env):
            self.cluster.remove_node(node, allow_graceful=False)
        psutil.wait_procs(workers, timeout=10)

    def shutdown(self) -> None:
        from ray._private import ray_constants

        with _environ(self.env):
            self.cluster.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        ray_constants.ENABLE_RAY_CLUSTER = self._cluster_flag
