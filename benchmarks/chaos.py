"""Chaos run: the batch job on a multi-node Ray cluster while replicas, memory shards,
nodes and the driver are killed, the object store goes away, and scripts hang.

Everything runs on this machine, on 127.0.0.1: a moto S3 server (versioned bucket: a
record written twice would show as two versions), a Ray cluster of several raylets
(tests/ray_cluster.py LocalCluster; worker nodes carry a `fake_gpu` resource that
stands in for a GPU and the S3 credentials in their environment, as a node's role
would), and `python jobs/batch.py` as the driver, in a subprocess. The manifest mixes
good scripts with hostile lines (bad JSON, binary, 2 MiB lines, scripts that could never
finish, lone surrogates, coerced types, re-used ids, exact repeats). A few scripts hang
(MEMFLOW_TEST_HANG, test-only): some on their first attempt only (they must be committed
after the stall watchdog restarts their replica), one on every attempt (it must be
reported failed).

While the job runs, a seeded chaos loop kills a replica, kills a memory shard, removes a
worker node (adding a fresh one a little later), SIGKILLs the driver (which is then
started again, as a resubmission would), or stops the S3 server for a while. When the
chaos budget is spent the job is left to finish, and the outputs are checked: every good
script committed exactly once (one version of its record, its mp4, one dataset row),
every bad line in errors.jsonl with its line, the always-hanging script reported with its
stall, and the exit status and summary.json in line with what is there. Any violation
raises AssertionError.

    python benchmarks/chaos.py [--scripts 300] [--bad 150] [--nodes 3] [--chaos-seconds 600] [--seed 1]

Prints what was killed, what survived, how long it took, and the driver's summary.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BUCKET = "chaos"
SECRET = "chaosSecretKey/NeverInLogs+0123456789"


@dataclass
class Manifest:
    lines: list[bytes] = field(default_factory=list)
    good: dict[str, int] = field(default_factory=dict)  # video id -> line
    bad: dict[int, str] = field(default_factory=dict)  # line -> what the reason must say
    repeats: int = 0


def build_manifest(n_good: int, n_bad: int, rng: random.Random, seconds: tuple[float, float] = (1, 2)) -> Manifest:
    """Good scripts of one or two segments of `seconds` (tiny preset: about a second of CPU
    per second of video) with hostile lines in between."""
    from memflow.script import parse_script

    goods = []
    for i in range(n_good):
        segments = [{"prompt": f"chaos scene {i}, shot {j}", "seconds": round(rng.uniform(*seconds) * 2) / 2}
                    for j in range(rng.choice([1, 2]))]
        goods.append({"id": f"c{i:04d}", "seed": i, "segments": segments} if i % 5 else
                     {"seed": i, "segments": segments})  # every fifth without id: named by content
    hostile = [
        (lambda i: b'{"prompts": ["unterminated"', "invalid JSON"),
        (lambda i: b"\x00\x01binary\xff\xfe", "binary"),
        (lambda i: b'{"prompts": ["' + b"x" * (2 << 20) + b'"]}', "longer than"),
        (lambda i: json.dumps({"segments": [{"prompt": "forever", "seconds": 1e9}]}).encode(), "seconds:"),
        (lambda i: json.dumps({"prompts": ["a"], "resolution": [2 ** 70, 16]}).encode(), "resolution:"),
        (lambda i: b'{"prompts": ["a fox \\ud83e in the snow"]}', "not valid Unicode text"),
        (lambda i: json.dumps({"prompts": ["a"], "fps": "16"}).encode(), "fps:"),
        (lambda i: json.dumps({"segments": [{"prompt": "a", "seconds": True}]}).encode(), "seconds"),
        (lambda i: json.dumps({"prompts": ["a"], "colour": "red"}).encode(), "unknown field"),
        (lambda i: json.dumps({"segments": [{"prompt": "  ", "seconds": 2}]}).encode(), "prompt is empty"),
        (lambda i: b'\xff\xfe{"prompts": ["latin-1 \xe9"]}', "UTF-8"),
    ]
    m = Manifest()
    order = [("good", g) for g in goods] + [("bad", None)] * n_bad
    rng.shuffle(order)
    seen: dict[str, int] = {}
    for kind, script in order:
        n = len(m.lines) + 1
        if kind == "good":
            vid = parse_script(script).video_id
            m.lines.append(json.dumps(script).encode())
            m.good[vid], seen[vid] = n, n
            continue
        if seen and rng.random() < 0.25:  # an id that is already there: repeat or clash
            vid = rng.choice(sorted(seen))
            original = json.loads(m.lines[seen[vid] - 1])
            if rng.random() < 0.5:
                m.lines.append(json.dumps(original).encode())
                m.repeats += 1
            else:
                m.lines.append(json.dumps({**original, "seed": original["seed"] + 10_000, "id": vid}).encode())
                m.bad[n] = f"duplicate id {vid!r}: line {seen[vid]} has it with different content"
            continue
        make, reason = rng.choice(hostile)
        m.lines.append(make(n))
        m.bad[n] = reason
    return m


class S3:
    """moto on 127.0.0.1 that can be stopped and started again on the same port (its
    data lives in this process, so it survives the outage)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.down = False

    def outage(self, seconds: float) -> None:
        from moto.server import ThreadedMotoServer

        self.server.stop()
        self.down = True
        time.sleep(seconds)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.down = False

    def stop(self) -> None:
        self.server.stop()


class DriverProcess:
    """`python jobs/batch.py` against the cluster, restarted after each SIGKILL."""

    def __init__(self, argv: list[str], env: dict, logs: Path):
        self.argv, self.env, self.logs = argv, env, logs
        self.runs: list[int | None] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.logs / f"driver-{len(self.runs) + 1}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "jobs/batch.py", *self.argv], cwd=REPO, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.runs.append(None)

    def kill(self) -> None:
        if self.poll() is not None:
            return  # it ended by itself meanwhile
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.runs[-1] = -9

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is not None:
            self.runs[-1] = code
        return code


def named_actors(prefix: str) -> list:
    import ray

    found = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith(prefix):
            try:
                found.append(ray.get_actor(a["name"], namespace=a["namespace"]))
            except ValueError:  # gone meanwhile
                continue
    return found


def chaos_loop(cluster, nodes: list, driver: DriverProcess, s3: S3, rng: random.Random, budget_s: float,
               gap_s: tuple[float, float], kills: Counter, stop: threading.Event, creds: dict) -> None:
    """One random fault every gap_s seconds until the budget is spent."""
    import ray

    end = time.monotonic() + budget_s
    actions = ["replica"] * 4 + ["shard"] * 2 + ["node"] * 2 + ["driver", "storage"]
    while time.monotonic() < end and not stop.wait(rng.uniform(*gap_s)):
        if driver.poll() is not None:
            return  # the job ended by itself before the budget was spent
        action = rng.choice(actions)
        if action in ("replica", "shard"):
            actors = named_actors("memflow-replica-" if action == "replica" else "memflow-memory-")
            if actors:
                ray.kill(rng.choice(actors), no_restart=False)
                kills[action] += 1
        elif action == "node" and nodes:
            victim = nodes.pop(rng.randrange(len(nodes)))
            cluster.remove_node(victim)
            kills["node"] += 1
            if not stop.wait(rng.uniform(3, 15)):
                nodes.append(cluster.add_node(env=creds))
        elif action == "driver":
            driver.kill()
            kills["driver"] += 1
            stop.wait(rng.uniform(1, 5))
            driver.start()
        elif action == "storage":
            seconds = rng.uniform(20, 45)
            s3.outage(seconds)
            kills["storage outage"] += 1
            kills["storage seconds"] += round(seconds)


def check(s3_client, prefix: str, manifest: Manifest, hang_always: set[str], final: dict) -> dict:
    """Everything the run must have left behind; raises AssertionError on a violation."""
    import pyarrow.parquet as pq

    def read(key: str) -> bytes:
        return s3_client.get_object(Bucket=BUCKET, Key=f"{prefix}/{key}")["Body"].read()

    def keys(folder: str) -> list[str]:
        pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/{folder}/")
        return sorted(o["Key"].rsplit("/", 1)[-1] for page in pages for o in page.get("Contents", []))

    expected = set(manifest.good) - hang_always
    records = {k.removesuffix(".json") for k in keys("records")}
    assert records == expected, f"missing {sorted(expected - records)[:10]}, extra {sorted(records - expected)[:10]}"
    versions = Counter()
    pages = s3_client.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=f"{prefix}/records/")
    for page in pages:
        for v in page.get("Versions", []):
            versions[v["Key"].rsplit("/", 1)[-1].removesuffix(".json")] += 1
    twice = {k: n for k, n in versions.items() if n != 1}
    assert not twice, f"records written more than once: {twice}"
    assert {k.removesuffix(".mp4") for k in keys("videos")} >= expected
    rows = [r["id"] for name in keys("manifest")
            for r in pq.read_table(io.BytesIO(read(f"manifest/{name}"))).to_pylist()]
    assert sorted(rows) == sorted(expected), "one dataset row per committed video"

    errors = [json.loads(line) for line in read("errors.jsonl").decode().splitlines()]
    by_line = {e["line"]: e for e in errors}
    assert len(by_line) == len(errors), "each line reported once"
    for n, reason in manifest.bad.items():
        assert n in by_line and reason in by_line[n]["reason"], (n, reason, by_line.get(n))
    failed = {e["id"] for e in errors if "id" in e}
    assert failed == hang_always, f"failed: {failed}, expected {hang_always}"
    for e in errors:  # its attempts end in stalls (or in a kill of the chaos, if one hit it first)
        if "id" in e:
            assert any(a.startswith("stalled: no progress") for a in e["attempts"]), e

    summary = json.loads(read("summary.json"))
    assert summary["rejected_input"] == len(manifest.bad)
    assert summary["failed"] == len(hang_always)
    assert summary["committed"] + summary["skipped_already_committed"] == len(expected)
    assert summary["skipped_repeated_lines"] == manifest.repeats
    assert summary["dataset_rows"] == len(expected)
    status = 1 if manifest.bad or hang_always else 0
    assert summary["exit_status"] == final["exit"] == status, (summary["exit_status"], final["exit"])
    return summary


def run(n_good: int = 300, n_bad: int = 150, n_nodes: int = 3, chaos_s: float = 600, seed: int = 1,
        gap_s: tuple[float, float] = (8, 20), workdir: Path | None = None, timeout_s: float = 3600,
        segment_s: tuple[float, float] = (1, 2)) -> dict:
    import boto3
    import ray

    from tests.ray_cluster import LocalCluster

    rng = random.Random(seed)
    workdir = workdir or Path(f"/tmp/memflow-chaos-{uuid.uuid4().hex[:6]}")
    workdir.mkdir(parents=True, exist_ok=True)
    creds = {"AWS_ACCESS_KEY_ID": "chaos", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    os.environ.update(creds)
    manifest = build_manifest(n_good, n_bad, rng, segment_s)
    goods = sorted(manifest.good)
    hang_once = set(rng.sample(goods, min(3, len(goods))))
    hang_always = {rng.choice(sorted(set(goods) - hang_once))}
    hang = ",".join([f"{v}:1" for v in sorted(hang_once)] + sorted(hang_always))

    s3 = S3()
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    client.create_bucket(Bucket=BUCKET)
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    client.put_object(Bucket=BUCKET, Key="scripts.jsonl", Body=b"\n".join(manifest.lines) + b"\n")
    cluster = LocalCluster(head_cpus=2)
    node_env = {**creds, "MEMFLOW_TEST_HANG": hang}
    nodes = [cluster.add_node(env=node_env) for _ in range(n_nodes)]
    env = {**os.environ, **cluster.env, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}
    argv = ["--scripts", f"s3://{BUCKET}/scripts.jsonl", "--output", f"s3://{BUCKET}/run",
            "--endpoint-url", s3.endpoint, "--preset", "tiny", "--replica-resources", '{"fake_gpu": 1}',
            "--max-replicas", str(n_nodes), "--memory-shards", "2", "--max-attempts", "4", "--stall-timeout", "45"]
    driver = DriverProcess(argv, env, workdir)
    kills: Counter = Counter()
    stop = threading.Event()
    t0 = time.monotonic()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        driver.start()
        chaos = threading.Thread(target=chaos_loop, args=(cluster, nodes, driver, s3, rng, chaos_s, gap_s, kills,
                                                          stop, node_env), daemon=True)
        chaos.start()
        chaos.join(timeout_s)
        while True:  # the chaos is over: let the job end; resubmit it if it was killed or failed (exit 2)
            try:
                driver.proc.wait(max(1.0, t0 + timeout_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the job did not end within {timeout_s:.0f} s") from None
            if driver.poll() in (0, 1) or len(driver.runs) > 20:
                break
            driver.start()
        wall = time.monotonic() - t0
        final = {"exit": driver.runs[-1]}
        summary = check(client, "run", manifest, hang_always, final)
        logs = b"".join(p.read_bytes() for p in workdir.glob("driver-*.log"))
        assert SECRET.encode() not in logs, "the secret key is in a driver log"
        return {"wall_s": wall, "kills": dict(kills), "driver_runs": driver.runs, "good": len(manifest.good),
                "bad_lines": len(manifest.bad), "repeats": manifest.repeats, "hang_once": sorted(hang_once),
                "hang_always": sorted(hang_always), "summary": summary, "logs": str(workdir)}
    finally:
        stop.set()
        if driver.proc is not None and driver.proc.poll() is None:
            driver.kill()
        ray.shutdown()
        cluster.shutdown()
        s3.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scripts", type=int, default=300, help="good scripts in the manifest")
    ap.add_argument("--bad", type=int, default=150, help="hostile lines in the manifest")
    ap.add_argument("--nodes", type=int, default=3, help="GPU (fake_gpu) worker nodes")
    ap.add_argument("--chaos-seconds", type=float, default=600, help="how long faults are injected")
    ap.add_argument("--gap", type=float, nargs=2, default=(8, 20), metavar=("MIN", "MAX"),
                    help="seconds between faults (uniform)")
    ap.add_argument("--segment-seconds", type=float, nargs=2, default=(1, 2), metavar=("MIN", "MAX"),
                    help="length of each of a script's one or two segments (uniform, in half seconds)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds the whole run may take")
    args = ap.parse_args()
    report = run(args.scripts, args.bad, args.nodes, args.chaos_seconds, args.seed, tuple(args.gap),
                 timeout_s=args.timeout, segment_s=tuple(args.segment_seconds))
    s = report["summary"]
    print(f"chaos run (seed {args.seed}): {report['good']} good scripts, {report['bad_lines']} bad lines, "
          f"{report['repeats']} exact repeats, on {args.nodes} fake-GPU nodes")
    print(f"faults: {report['kills']}")
    print(f"driver runs (exit status, -9 = killed): {report['driver_runs']}")
    print(f"hung on the first attempt (committed after a watchdog restart): {report['hang_once']}; "
          f"hung on every attempt (reported failed): {report['hang_always']}")
    print(f"last run's summary: committed {s['committed']}, already committed {s['skipped_already_committed']}, "
          f"repeats {s['skipped_repeated_lines']}, failed {s['failed']}, rejected {s['rejected_input']}, "
          f"dataset rows {s['dataset_rows']}, exit {s['exit_status']}")
    print(f"all checks passed: every good script committed exactly once, every bad line reported; "
          f"{report['wall_s']:.0f} s in all (driver logs: {report['logs']})")


if __name__ == "__main__":
    main()
