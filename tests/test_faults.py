"""Failures of the cluster never cost a script an attempt (cluster/faults.py): on a multi-node
cluster on 127.0.0.1 with --max-attempts 1, nodes holding replicas and memory shards are
removed mid-render, again and again, and no good script fails; a script that kills its
replica every time ends after --max-replica-deaths; a script that raises ends after
--max-attempts; a cluster that never recovers ends the job after --infra-timeout."""
from __future__ import annotations

import json
import time

import pytest
import ray

from cluster.faults import StorageUnavailable
from cluster.pool import ReplicaPool
from cluster.replica import CRASH_ENV, RAISE_ENV
from cluster.scheduler import InfraTimeout, Scheduler, Task
from jobs import batch

from .ray_cluster import node_credentials
from .test_batch_job import Driver, Outputs, check_committed, long_scripts, wait_for
from .test_elastic import GPU, record_versions, replica_statuses, versioned_bucket  # noqa: F401 (a fixture)


def shard_nodes() -> dict[str, str]:
    """Memory shard actor name -> the node it lives on (shards that answer now)."""
    found = {}
    for name in ray.util.list_named_actors():
        if name.startswith("memflow-memory-"):
            try:
                found[name] = ray.get(ray.get_actor(name).stats.remote(), timeout=5)["node"]
            except Exception:  # restarting, or gone
                continue
    return found


def test_lost_nodes_never_fail_a_good_script(ray_cluster, s3_server, versioned_bucket, tmp_path):
    """Three GPU nodes; a render runs on each. Three times, a node with a busy replica (and the
    memory shards on it, if any) is removed and a fresh one joins. With one attempt allowed,
    every script is committed, exactly once, and the records say what the cluster cost."""
    s3, bucket = versioned_bucket
    prefix = "lost"
    scripts = long_scripts("lost", 9)
    s3.put_object(Bucket=bucket, Key="scripts.jsonl", Body=b"".join(json.dumps(s).encode() + b"\n" for s in scripts))
    nodes = [ray_cluster.add_node(env=node_credentials()) for _ in range(3)]
    driver = Driver("--scripts", f"s3://{bucket}/scripts.jsonl", "--output", f"s3://{bucket}/{prefix}",
                    "--endpoint-url", s3_server, "--replicas", "3", "--replica-resources", GPU,
                    "--memory-shards", "2", "--in-flight", "1", "--max-attempts", "1", "--checkpoint-seconds", "0.5")
    driver.start()
    removed = []
    for _ in range(3):
        busy = wait_for("a replica rendering", lambda: next(
            (s for s in replica_statuses() if s["video"] and s["chunk"] >= 2 and s["node"] in
             {n.node_id for n in nodes}), None), timeout=300, driver=driver)
        node = next(n for n in nodes if n.node_id == busy["node"])
        shards_there = [name for name, at in shard_nodes().items() if at == node.node_id]
        ray_cluster.remove_node(node)  # spot preemption: everything on it at once
        removed.append((busy["video"], shards_there))
        nodes.remove(node)
        nodes.append(ray_cluster.add_node(env=node_credentials()))
    status = driver.finish(900)
    out = Outputs(s3=(s3, bucket, prefix))
    assert status == batch.EXIT_OK, json.dumps(out.errors())
    records = check_committed(out, {s["id"]: s for s in scripts}, tmp_path)
    assert record_versions(s3, bucket, prefix) == {vid: 1 for vid in records}, "each record written once"
    summary = out.summary()
    assert (summary["committed"], summary["failed"]) == (len(scripts), 0)
    hit = {vid for vid, _ in removed}
    costs = {vid: records[vid]["failures"] for vid in hit}
    for vid, cost in costs.items():  # (a render may have just ended when its node went)
        assert cost["attempts"] == 0, (vid, cost)  # the cluster's failures, never the script's
    assert sum(c["cluster_faults"] for c in costs.values()) >= 1, costs
    assert any("node" in r and "lost" in r for vid in hit for r in records[vid]["cluster_reasons"]), costs


def test_a_poison_script_ends_after_its_replica_deaths_a_raising_one_after_its_attempts(ray_cluster, tmp_path):
    scripts = long_scripts("poison", 3)
    crash, raises = scripts[0]["id"], scripts[1]["id"]
    ray_cluster.add_node(env={CRASH_ENV: crash, RAISE_ENV: raises})
    manifest = tmp_path / "scripts.jsonl"
    manifest.write_text("".join(json.dumps(s) + "\n" for s in scripts))
    out = tmp_path / "out"
    status = batch.main(["--scripts", str(manifest), "--output", str(out), "--replicas", "1", "--preset", "tiny",
                         "--replica-resources", GPU, "--max-attempts", "1", "--max-replica-deaths", "2",
                         "--memory-shards", "0"])
    assert status == batch.EXIT_PARTIAL
    o = Outputs(out)
    assert set(o.records()) == {scripts[2]["id"]}, "the good script is committed; the job went on"
    errors = {e["id"]: e for e in o.errors()}
    assert errors[crash]["reason"] == "failed: its replica died 2 time(s) while rendering it"
    assert errors[crash]["history"]["replica_deaths"] == 2 and errors[crash]["history"]["attempts"] == 0
    assert all("died on a live node" in a for a in errors[crash]["attempts"]), errors[crash]
    assert errors[raises]["reason"] == "failed after 1 attempt(s)"
    assert "fails here on purpose" in errors[raises]["attempts"][-1] and errors[raises]["history"]["attempts"] == 1


@ray.remote(num_cpus=0)
class Outage:
    """A replica whose storage is down for good: every render fails as the cluster's."""

    def render(self, script):
        raise StorageUnavailable("storage pipe_file kept failing after 10 retries: ConnectionError")

    def status(self):
        return {}


def test_a_cluster_that_never_recovers_ends_the_run_after_the_infra_timeout(ray_client):
    pool = ReplicaPool(lambda i: Outage.remote(), lambda a: a.status.options(max_task_retries=-1).remote(), size=1)
    scheduler = Scheduler(pool, lambda a, t: a.render.remote(t.script), max_attempts=1, infra_timeout_s=3,
                          backoff_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(InfraTimeout, match="the cluster kept failing under 'a' .* StorageUnavailable"):
        list(scheduler.run([Task("a", "a", 1)]))
    assert time.monotonic() - t0 < 60
    pool.close()


def test_a_killed_memory_shard_costs_no_attempt(ray_cluster, tmp_path):
    """The shard restarts without the video's state: VideoStateLost is the cluster's failure.
    With one attempt allowed, the video is retried (from its checkpoint) and committed."""
    ray_cluster.add_node()
    scripts = long_scripts("shardloss", 2)
    manifest = tmp_path / "scripts.jsonl"
    manifest.write_text("".join(json.dumps(s) + "\n" for s in scripts))
    driver = Driver("--scripts", str(manifest), "--output", str(tmp_path / "out"), "--replicas", "1",
                    "--replica-resources", GPU, "--memory-shards", "1", "--max-attempts", "1",
                    "--checkpoint-seconds", "0.3")
    driver.start()
    busy = wait_for("a render past its first bank updates", lambda: next(
        (s for s in replica_statuses() if s["video"] and s["chunk"] >= 8), None), driver=driver)
    [shard] = [n for n in ray.util.list_named_actors() if n.startswith("memflow-memory-")]
    ray.kill(ray.get_actor(shard), no_restart=False)
    assert driver.finish() == batch.EXIT_OK
    record = Outputs(tmp_path / "out").json(f"records/{busy['video']}.json")
    assert record["failures"]["attempts"] == 0 and record["failures"]["cluster_faults"] >= 1, record["failures"]
    assert any("VideoStateLost" in r or "ShardUnavailable" in r for r in record["cluster_reasons"])
    assert record["story"]["chunks"]["replayed"] > 0, "retried from its checkpoint"

