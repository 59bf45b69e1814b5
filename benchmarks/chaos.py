"""Chaos run: the batch job on a multi-node Ray cluster while replicas, memory shards,
nodes and the driver are killed, the object store goes away, and scripts hang.

Everything runs on this machine, on 127.0.0.1: a moto S3 server (versioned bucket: a
record written twice would show as two versions), a Ray cluster of several raylets
(tests/ray_cluster.py LocalCluster; worker nodes carry a `fake_gpu` resource that
stands in for a GPU and the S3 credentials in their environment, as a node's role
would), and `python jobs/batch.py` as the driver, in a subprocess. The manifest mixes
good scripts with hostile lines (bad JSON, binary, 2 MiB lines, scripts that could never
finish, lone surrogates, coerced types, re-used ids, exact repeats), and stories: long
videos, branching trees and continuations of their nodes. A few scripts hang
(MEMFLOW_TEST_HANG, test-only): with --max-attempts above 1, some on their first attempt
only (they must be committed after the stall watchdog restarts their replica); one on
every attempt (it must be reported failed).

While the job runs, a seeded chaos loop kills a replica, kills a memory shard, removes a
worker node (adding a fresh one a little later), SIGKILLs the driver (which is then
started again, as a resubmission would), or stops the S3 server for a while; and, with
--node-every N, a node is lost every N seconds besides (a steady spot-reclaim rate). A
watcher reads the dataset table every few seconds. When the chaos budget is spent the
job is left to finish, and the outputs are checked: no good script failed (with one
attempt allowed by default: the cluster's failures never cost one), every video committed
exactly once (one version of its record, its mp4, one row in the manifest table), no
snapshot of the table ever showing a row twice (those the watcher read, and every version
after), every node of a tree and every continuation identical to its flattened script
rendered alone, every bad line in errors.jsonl with its line, the always-hanging script
reported with its stall, and the exit status and summary.json in line with what is there.
Any violation raises AssertionError.

    python benchmarks/chaos.py [--scripts 300] [--bad 150] [--trees 6] [--nodes 3] [--chaos-seconds 600]
                               [--node-every 40] [--max-attempts 1] [--seed 1]

Prints what was killed, what survived, how long it took, and the driver's summary.
"""
from __future__ import annotations

import argparse
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
    good: dict[str, int] = field(default_factory=dict)  # video id -> line (every node of a tree)
    bad: dict[int, str] = field(default_factory=dict)  # line -> what the reason must say
    repeats: int = 0
    stories: dict[str, dict] = field(default_factory=dict)  # tree node or continuation id -> its line's script


def story_lines(n_trees: int, rng: random.Random) -> list[dict]:
    """Long videos, trees (3-5 nodes, one without a video) and continuations of their nodes."""
    lines = []
    for t in range(n_trees):
        seg = lambda what, s: {"prompt": f"story {t}: {what}", "seconds": s}  # noqa: E731
        if t % 3 == 0:  # a long video: checkpoints and resume
            lines.append({"id": f"long{t}", "seed": t, "segments": [seg(f"act {i}", 4) for i in range(3)]})
            continue
        lines.append({"id": f"tree{t}", "seed": t, "segments": [seg("the trunk", 2)], "branches": [
            {"id": f"tree{t}-a", "segments": [seg("ending a", 1.5)],
             "branches": [{"id": f"tree{t}-a1", "segments": [{**seg("epilogue", 1), "seed": t}]}]},
            {"id": f"tree{t}-b", "video": False, "segments": [seg("a turn", 1)],
             "branches": [{"id": f"tree{t}-b1", "segments": [seg("ending b", 1.5)]}]}]})
        lines.append({"id": f"more{t}", "continues": f"tree{t}-a", "segments": [seg("the sequel", 1.5)]})
    rng.shuffle(lines)  # a continuation may come before its parent
    return lines


def build_manifest(n_good: int, n_bad: int, rng: random.Random, seconds: tuple[float, float] = (1, 2),
                   n_trees: int = 0) -> Manifest:
    """Good scripts of one or two segments of `seconds` (tiny preset: about a second of CPU
    per second of video) and stories, with hostile lines in between."""
    from memflow.script import parse_script

    goods = []
    for i in range(n_good):
        segments = [{"prompt": f"chaos scene {i}, shot {j}", "seconds": round(rng.uniform(*seconds) * 2) / 2}
                    for j in range(rng.choice([1, 2]))]
        goods.append({"id": f"c{i:04d}", "seed": i, "segments": segments} if i % 5 else
                     {"seed": i, "segments": segments})  # every fifth without id: named by content
    goods += story_lines(n_trees, rng)
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
            parsed = parse_script(script)
            m.lines.append(json.dumps(script).encode())
            for node in (n_ for n_ in parsed.nodes() if n_.video):
                m.good[node.video_id] = n
                if parsed.is_tree or parsed.continues:
                    m.stories[node.video_id] = script
            seen[parsed.video_id] = n
            continue
        plain = sorted(v for v in seen if v not in m.stories)
        if plain and rng.random() < 0.25:  # an id that is already there: repeat or clash
            vid = rng.choice(plain)
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


def steady_node_loss(cluster, nodes: list, every_s: float, stop: threading.Event, kills: Counter,
                     creds: dict, driver: "DriverProcess") -> None:
    """A node lost every `every_s` seconds, a fresh one joining a few seconds later."""
    while not stop.wait(every_s) and driver.poll() is None:
        if nodes:
            cluster.remove_node(nodes.pop(0))
            kills["node (steady)"] += 1
            if not stop.wait(3):
                nodes.append(cluster.add_node(env=creds))


def watch_table(index, stop: threading.Event, seen: dict) -> None:
    """Read the manifest table every few seconds as a reader would: no snapshot may hold a row twice."""
    while not stop.wait(3):
        try:
            table = index.table("manifest")
            if table is None:
                continue
            ids = [r["id"] for r in table.to_pyarrow_table(columns=["id"]).to_pylist()]
        except Exception:  # storage down for a moment: read again next time
            continue
        seen[table.version()] = len(ids) - len(set(ids))


def same_as_flat(s3_client, prefix: str, manifest: Manifest) -> int:
    """Every story video's latents equal its flattened script rendered alone (tiny, CPU,
    with as many threads as the replica had: on a CPU the last bits depend on that)."""
    import torch
    from safetensors.torch import load

    from memflow.pipeline import MemFlowGenerator
    from memflow.script import parse_script

    gen = MemFlowGenerator.from_preset("tiny", device="cpu")
    fpc = gen.memory.frames_per_chunk
    differ, threads = [], torch.get_num_threads()
    try:
        for vid in sorted(manifest.stories):
            record = json.loads(s3_client.get_object(Bucket=BUCKET, Key=f"{prefix}/records/{vid}.json")["Body"].read())
            saved = load(s3_client.get_object(Bucket=BUCKET, Key=f"{prefix}/latents/{vid}.safetensors")["Body"].read())
            torch.set_num_threads(record["replica"]["cpu_threads"])
            alone = gen.generate(parse_script({**record["script"], "id": vid}))
            if not torch.equal(saved["latents"], alone.latents):
                chunks = [c for c in range(alone.latents.shape[2] // fpc)
                          if not torch.equal(saved["latents"][:, :, c * fpc:(c + 1) * fpc],
                                             alone.latents[:, :, c * fpc:(c + 1) * fpc])]
                differ.append(f"{vid}: chunks {chunks} of {alone.latents.shape[2] // fpc} differ; "
                              f"attempts {record.get('attempts')}, story {record.get('story')}, "
                              f"failures {record.get('failures')}")
    finally:
        torch.set_num_threads(threads)
    assert not differ, "videos differ from their flat renders:\n" + "\n".join(differ)
    return len(manifest.stories)


def check(s3_client, prefix: str, manifest: Manifest, hang_always: set[str], final: dict, index,
          snapshots: dict) -> dict:
    """Everything the run must have left behind; raises AssertionError on a violation."""
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
    rows = [r["id"] for r in index.read("manifest")]
    assert sorted(rows) == sorted(expected), "one dataset row per committed video"
    for version in range(index.table("manifest").version() + 1):
        ids = [r["id"] for r in index.read("manifest", version)]
        snapshots.setdefault(version, len(ids) - len(set(ids)))
    doubled = {v: n for v, n in snapshots.items() if n}
    assert not doubled, f"table snapshots with a row twice: {doubled}"
    assert not keys("state"), "checkpoints left behind"

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
        segment_s: tuple[float, float] = (1, 2), n_trees: int = 6, node_every_s: float | None = None,
        max_attempts: int = 1) -> dict:
    import boto3
    import ray

    from cluster.dataset import DatasetIndex
    from cluster.storage import Storage
    from tests.ray_cluster import LocalCluster

    rng = random.Random(seed)
    workdir = workdir or Path(f"/tmp/memflow-chaos-{uuid.uuid4().hex[:6]}")
    workdir.mkdir(parents=True, exist_ok=True)
    creds = {"AWS_ACCESS_KEY_ID": "chaos", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    os.environ.update(creds)
    manifest = build_manifest(n_good, n_bad, rng, segment_s, n_trees)
    goods = sorted(set(manifest.good) - set(manifest.stories))
    # a script that hangs on its first attempt only needs a second one (a stall is its own failure)
    hang_once = set(rng.sample(goods, min(3, len(goods)))) if max_attempts > 1 else set()
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
            "--max-replicas", str(n_nodes), "--memory-shards", "2", "--max-attempts", str(max_attempts),
            "--stall-timeout", "45", "--save-latents", "--checkpoint-seconds", "2"]
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
        index = DatasetIndex(Storage(f"s3://{BUCKET}/run", s3.endpoint))
        snapshots: dict = {}
        threading.Thread(target=watch_table, args=(index, stop, snapshots), daemon=True).start()
        if node_every_s:
            steady = threading.Thread(target=steady_node_loss, args=(cluster, nodes, node_every_s, stop, kills,
                                                                     node_env, driver), daemon=True)
            steady.start()
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
        stop.set()
        final = {"exit": driver.runs[-1]}
        summary = check(client, "run", manifest, hang_always, final, index, snapshots)
        identical = same_as_flat(client, "run", manifest)
        logs = b"".join(p.read_bytes() for p in workdir.glob("driver-*.log"))
        assert SECRET.encode() not in logs, "the secret key is in a driver log"
        return {"wall_s": wall, "kills": dict(kills), "driver_runs": driver.runs, "good": len(manifest.good),
                "stories": len(manifest.stories), "identical_to_flat": identical, "snapshots_read": len(snapshots),
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
    ap.add_argument("--trees", type=int, default=6, help="story lines: long videos, trees and continuations")
    ap.add_argument("--node-every", type=float, help="also lose a node every this many seconds")
    ap.add_argument("--max-attempts", type=int, default=1, help="the job's --max-attempts (default 1)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds the whole run may take")
    args = ap.parse_args()
    report = run(args.scripts, args.bad, args.nodes, args.chaos_seconds, args.seed, tuple(args.gap),
                 timeout_s=args.timeout, segment_s=tuple(args.segment_seconds), n_trees=args.trees,
                 node_every_s=args.node_every, max_attempts=args.max_attempts)
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
    print(f"stories: {report['stories']} videos of trees and continuations, {report['identical_to_flat']} checked "
          f"identical to their flat renders; dataset snapshots read during the run: {report['snapshots_read']}")
    print(f"all checks passed: every good script committed exactly once, every bad line reported, no snapshot "
          f"with a row twice; {report['wall_s']:.0f} s in all (driver logs: {report['logs']})")


if __name__ == "__main__":
    main()
