"""Checks on infra/: the image (Dockerfile), the AWS cluster launcher config, the KubeRay RayJob,
and a real run of infra/local_head.sh (start, job API answers on loopback only, scoped stop)."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"  # BuildKit's per-Dockerfile ignore file
CLUSTER = INFRA / "cluster.yaml"
RAYJOB = INFRA / "rayjob.yaml"
LOCAL_HEAD = INFRA / "local_head.sh"

SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.I)
# An AWS access key id, or a secret key / token written as a value (env files, YAML, flags).
LITERAL_SECRETS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|aws_secret_access_key)\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{16,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the image's Python)
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _rayjob() -> dict:
    docs = [d for d in _yaml_docs(RAYJOB) if d.get("kind") == "RayJob"]
    assert len(docs) == 1, "infra/rayjob.yaml must hold exactly one RayJob"
    return docs[0]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued instruction"
    return out


def _base_image() -> str:
    ins = _dockerfile_instructions()
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) == 1, "one build stage expected"
    image = froms[0].split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


def _pods(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec["workerGroupSpecs"]:
        pods[f"worker:{group['groupName']}"] = group["template"]["spec"]
    if "submitterPodTemplate" in rayjob["spec"]:
        pods["submitter"] = rayjob["spec"]["submitterPodTemplate"]["spec"]
    return pods


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_pinned_torch_and_the_project():
    ins = _dockerfile_instructions()
    runs = [rest for word, rest in ins if word == "RUN"]
    assert any(re.search(r"pip install\b.*\btorch==2\.13\.0\b", r) for r in runs), "torch==2.13.0 not pip-installed"
    # PyPI's Linux torch 2.13.0 wheel is the CUDA build: no CPU index may redirect it.
    assert not any("--index-url" in r or "download.pytorch.org" in r for r in runs)
    assert any(re.search(r"pip install\b[^&;|]*\s(-e\s+)?\.(\s|$)", r) for r in runs), "the project is not pip-installed"
    base = _base_image()
    assert "py311" in base, f"base image {base} is not the Python 3.11 one"


def test_dockerfile_copies_everything_the_build_needs():
    """COPY sources exist (build context = repo root), and cover pyproject's readme and packages."""
    copied: set[str] = set()
    for word, rest in _dockerfile_instructions():
        if word not in ("COPY", "ADD"):
            continue
        if "--from=" in rest:
            continue  # from another stage or image, not from the build context
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"
            copied.add(src.rstrip("/"))
    project = _pyproject()
    needed = {"pyproject.toml", project["project"]["readme"], "examples"}  # batch.py's default scripts
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed.add(pattern.rstrip("*").rstrip("."))
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"


def _docker_match(pattern: str, path: str) -> bool:
    """Docker's pattern syntax: `*` and `?` stay within one path element, `**` spans any number."""
    pp, cp = pattern.strip("/").split("/"), path.split("/")

    def rec(i: int, j: int) -> bool:
        if i == len(pp):
            return j == len(cp)
        if pp[i] == "**":
            return any(rec(i + 1, k) for k in range(j, len(cp) + 1))
        return j < len(cp) and fnmatch.fnmatchcase(cp[j], pp[i]) and rec(i + 1, j + 1)

    return rec(0, 0)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent dirs decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        if any(_docker_match(pat.lstrip("!"), prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    kept = ["pyproject.toml", "README.md", "memflow/__init__.py", "cluster/storage.py", "jobs/manifest.py",
            "examples/sample_scripts.jsonl"]
    dropped = [".venv/bin/python", ".git/HEAD", "outputs/x.mp4", "memflow/__pycache__/x.cpython-311.pyc",
               "tests/test_infra.py", ".env"]
    assert [p for p in kept if _ignored(p, patterns)] == []
    assert [p for p in dropped if not _ignored(p, patterns)] == []


# --------------------------------------------------------------------------- RayJob


def test_rayjob_runs_batch_py_on_autoscaled_gpu_workers():
    rj = _rayjob()
    assert rj["apiVersion"] == "ray.io/v1" and rj["kind"] == "RayJob"
    spec = rj["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] in ("python", "python3") and argv[1].endswith("jobs/batch.py"), argv
    flags = dict(zip(argv[2::2], argv[3::2]))
    for flag in ("--scripts", "--output", "--model"):
        assert flags.get(flag, "").startswith("s3://"), f"{flag} should be an s3:// URL"
    assert flags.get("--preset") == "wan2.1-1.3b" and flags.get("--device") == "gpu"
    from jobs.batch import parse_args  # the entrypoint's flags are the driver's

    args = parse_args(argv[2:]).settings
    assert args.replicas is None, "a fixed --replicas would not follow the autoscaler"

    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0

    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True, "GPU pods are added for pending replicas"
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_pods = 0
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        requested = container["resources"].get("requests", {}).get("nvidia.com/gpu")
        # Kubernetes: an extended resource's request, if given, must equal its limit.
        assert requested is None or int(requested) == gpus, group["groupName"]
        if gpus:
            assert gpus == 1, "one GPU per worker pod (one replica per GPU)"
            assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"], "starts at zero"
            gpu_pods += group["maxReplicas"]
    assert gpu_pods == args.max_replicas, f"--max-replicas {args.max_replicas} but at most {gpu_pods} GPU pods"
    # KubeRay's rayStartParams is map[string]string: a bare number fails the CRD's validation.
    for params in [cluster["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in cluster["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in params.values()), params


def test_rayjob_images_and_ray_version_match_the_dockerfile():
    rj = _rayjob()
    images = {c["image"] for pod in _pods(rj).values() for c in pod["containers"]}
    assert len(images) == 1, f"head, workers and submitter should run one image: {images}"
    cluster_image = yaml.safe_load(CLUSTER.read_text())["docker"]["image"]
    assert images == {cluster_image}, "infra/rayjob.yaml and infra/cluster.yaml name different images"
    base_version = re.search(r":(\d+\.\d+\.\d+)", _base_image()).group(1)
    assert rj["spec"]["rayClusterSpec"]["rayVersion"] == base_version


def test_rayjob_gets_credentials_from_service_account_or_secret_refs_only():
    docs = _yaml_docs(RAYJOB)
    accounts = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ServiceAccount"}
    for name, pod in _pods(_rayjob()).items():
        for c in pod["containers"]:
            for env in c.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env, f"{name}: {env['name']} has a literal value; use valueFrom / envFrom"
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']} not from a Secret"
        if name == "submitter":
            continue  # it only talks to the head's job API
        sa = pod.get("serviceAccountName")
        has_secret_ref = any("secretRef" in s for c in pod["containers"] for s in c.get("envFrom", []))
        assert sa or has_secret_ref, f"{name}: no way to get S3 credentials"
        if sa in accounts:
            assert "eks.amazonaws.com/role-arn" in accounts[sa]["metadata"].get("annotations", {})


def test_no_literal_secrets_in_infra():
    for path in sorted(INFRA.iterdir()):
        if path.is_file():
            text = path.read_text()
            for pattern in LITERAL_SECRETS:
                assert not pattern.search(text), f"{path.name}: looks like a literal secret ({pattern.pattern})"


# --------------------------------------------------------------------------- cluster launcher


def test_cluster_yaml_is_a_valid_ray_launcher_config():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(CLUSTER.read_text())
    schema = json.loads((Path(ray.autoscaler.__path__[0]) / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # no unknown or misspelt fields (the schema forbids them)
    validate_config(prepare_config(cfg))  # what `ray up` does before touching AWS


def test_cluster_yaml_has_gpu_workers_and_start_commands():
    cfg = yaml.safe_load(CLUSTER.read_text())
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    gpu_types = {k: t for k, t in types.items() if k != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, t in gpu_types.items():
        assert t["resources"]["GPU"] == 1, f"{name}: one GPU per node"
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
        assert re.match(r"(g4dn|g5|g6|g6e|gr6|p4d|p4de|p5|p5e|p5en|p6)\.", t["node_config"]["InstanceType"])
    assert cfg["docker"]["image"]
    head_cmds = " ; ".join(cfg["head_start_ray_commands"])
    worker_cmds = " ; ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head_cmds and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmds
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_cmds
    # Credentials come from instance profiles: nothing credential-like in the provider section.
    assert not SECRET_NAME.search(json.dumps(cfg["provider"]))


def test_cluster_node_configs_are_valid_run_instances_requests():
    """Each node_config is passed to EC2 RunInstances: check it against botocore's model offline."""
    import botocore.session
    from botocore.validate import ParamValidator

    ec2 = botocore.session.get_session().get_service_model("ec2")
    shape = ec2.operation_model("RunInstances").input_shape
    cfg = yaml.safe_load(CLUSTER.read_text())
    for name, t in cfg["available_node_types"].items():
        report = ParamValidator().validate(dict(t["node_config"], MinCount=1, MaxCount=1), shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


# --------------------------------------------------------------------------- local head


def _uses_ray_stop() -> bool:
    return "ray stop" in re.sub(r"#.*", "", LOCAL_HEAD.read_text())


def test_local_head_script_is_strict_and_parses():
    assert os.access(LOCAL_HEAD, os.X_OK), "infra/local_head.sh is not executable"
    text = LOCAL_HEAD.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert not _uses_ray_stop(), "`ray stop` kills every Ray process on the machine"
    subprocess.run(["bash", "-n", str(LOCAL_HEAD)], check=True)


def _free_ports(n: int) -> list[int]:
    """n distinct free ports outside Ray's default worker port range (10002-19999)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if not 10000 <= port < 20000 and port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _session_members(sid: int) -> list:
    import psutil

    out = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (psutil.Error, OSError):
            pass
    return out


def test_local_head_serves_jobs_on_loopback_and_stops_only_itself():
    import psutil

    if _uses_ray_stop():  # never run it: it would take down every Ray process on this machine
        pytest.fail("infra/local_head.sh calls `ray stop`")

    (gcs, dash, client, agent, autoscaler_metrics, dashboard_metrics) = _free_ports(6)
    state_dir = tempfile.mkdtemp(prefix="rlh-", dir="/tmp")  # short: Ray's socket paths must fit
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env.update(
        PATH=venv_bin + os.pathsep + env.get("PATH", ""),
        RAY_PORT=str(gcs), DASHBOARD_PORT=str(dash), RAY_CLIENT_SERVER_PORT=str(client),
        DASHBOARD_AGENT_LISTEN_PORT=str(agent), AUTOSCALER_METRIC_PORT=str(autoscaler_metrics),
        DASHBOARD_METRIC_PORT=str(dashboard_metrics), RAY_LOCAL_DIR=state_dir, RAY_NUM_CPUS="1",
        RAY_AUTH_TOKEN_PATH=os.path.join(state_dir, "auth_token"),  # keeps ~/.ray untouched
        RAY_START_TIMEOUT="90", RAY_STOP_TIMEOUT="30",
    )
    address = f"http://127.0.0.1:{dash}"

    def script(*args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([str(LOCAL_HEAD), *args], env=env, capture_output=True, text=True, timeout=timeout)

    # A bystander that `ray stop` would kill (its command line names a Ray worker script):
    # the scoped stop must leave it alone.
    sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)",
                                 "memflow-test-sentinel/default_worker.py"])
    try:
        from ray.autoscaler._private.constants import RAY_PROCESSES
        cmdline = " ".join(psutil.Process(sentinel.pid).cmdline())
        assert any(not by_name and kw in cmdline for kw, by_name in RAY_PROCESSES)
    except ImportError:
        pass
    leader = None
    try:
        started = script(timeout=150)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"export RAY_ADDRESS={address}\n" in started.stdout
        assert "ray job submit" in started.stdout
        leader = int(Path(state_dir, "head.pid").read_text())
        assert os.getsid(leader) == leader

        # The job API answers, with the token the script set up.
        jobs = subprocess.run([shutil.which("ray", path=env["PATH"]), "job", "list", "--address", address],
                              env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=60)
        assert jobs.returncode == 0, jobs.stdout + jobs.stderr
        assert script("status", timeout=30).returncode == 0

        # Everything the head listens on is loopback (the agent and the client server may bind a
        # little after the job API answers).
        deadline = time.monotonic() + 30
        while True:
            listening = {}
            for proc in _session_members(leader):
                try:
                    for conn in proc.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            listening[conn.laddr.port] = conn.laddr.ip
                except psutil.Error:
                    pass
            if {gcs, dash, client, agent} <= listening.keys() or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {gcs, dash, client, agent} <= listening.keys(), (listening, gcs, dash, client, agent)
        assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in listening.values()), listening

        stopped = script("stop", timeout=90)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        deadline = time.monotonic() + 15
        while _session_members(leader) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session_members(leader) == [], "processes of the head survived `stop`"
        assert script("status", timeout=30).returncode == 3
        assert sentinel.poll() is None, "stop killed a process that is not part of this head"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", gcs), timeout=2).close()
    finally:
        script("stop", timeout=90)
        if leader is not None:  # last resort, should the script have failed
            for proc in _session_members(leader):
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
        sentinel.kill()
        sentinel.wait(timeout=10)
        shutil.rmtree(state_dir, ignore_errors=True)
