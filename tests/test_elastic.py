"""The batch job on a multi-node Ray cluster on 127.0.0.1 (tests/ray_cluster.py LocalCluster):
nodes join and leave mid-run, as on an autoscaling cluster of spot GPU nodes. A custom
resource, `fake_gpu`, stands in for the GPU that each replica needs."""
from __future__ import annotations

import json
import uuid

import boto3
import pytest
import ray

from cluster.replica import HANG_ENV
from jobs import batch

from .ray_cluster import LocalCluster, node_credentials
from .test_batch_job import REPO, Driver, Outputs, by_id, check_committed, long_scripts, wait_for

GPU = json.dumps({LocalCluster.RESOURCE: 1})


def replica_statuses() -> list[dict]:
    """The status of every replica of the running job that answers now."""
    found = []
    for name in ray.util.list_named_actors():
        if name.startswith("memflow-replica-"):
            try:
                found.append(ray.get(ray.get_actor(name).status.remote(), timeout=5))
            except Exception:  # not placed yet, restarting, or gone
                continue
    return found


@pytest.fixture
def versioned_bucket(s3_server):
    """A bucket that keeps every version of every object: a record written twice shows."""
    s3 = boto3.client("s3", endpoint_url=s3_server)
    name = f"elastic-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return s3, name


def record_versions(s3, bucket: str, prefix: str) -> dict[str, int]:
    pages = s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=f"{prefix}/records/")
    counts: dict[str, int] = {}
    for page in pages:
        for v in page.get("Versions", []):
            key = v["Key"].rsplit("/", 1)[-1].removesuffix(".json")
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_pool_starts_with_one_node_grows_as_nodes_join_and_survives_a_lost_node(
        ray_cluster, s3_server, versioned_bucket, tmp_path):
    """Three replicas requested on a cluster with one GPU node: work starts at once on it.
    A second node joins and its replica gets work; that node is then lost mid-render
    (its replica and possibly a memory shard with it) and a third joins. Every script is
    committed exactly once (one version of each record in a versioned bucket).

    The joined node's renders hang after their first chunk (MEMFLOW_TEST_HANG in that node's
    env), so the node is surely lost mid-render: a ~20-chunk tiny render can otherwise end in
    the second it takes to poll the replicas and remove the node."""
    s3, bucket = versioned_bucket
    prefix = "run"
    scripts = long_scripts("elastic", 8)
    s3.put_object(Bucket=bucket, Key="scripts.jsonl", Body=b"".join(json.dumps(s).encode() + b"\n" for s in scripts))
    first = ray_cluster.add_node(env=node_credentials())
    driver = Driver("--scripts", f"s3://{bucket}/scripts.jsonl", "--output", f"s3://{bucket}/{prefix}",
                    "--endpoint-url", s3_server, "--replicas", "3", "--replica-resources", GPU,
                    "--memory-shards", "2", "--in-flight", "1")
    driver.start()
    wait_for("the first commit, with one node up", lambda: record_versions(s3, bucket, prefix), driver=driver)
    joined = ray_cluster.add_node(env={**node_credentials(), HANG_ENV: ",".join(s["id"] for s in scripts)})
    busy = wait_for("the joined node's replica to render", lambda: next(
        (s for s in replica_statuses() if s["node"] == joined.node_id and s["video"] and s["chunk"] >= 1), None),
        driver=driver)
    ray_cluster.remove_node(joined)  # spot preemption: everything on it dies at once
    third = ray_cluster.add_node(env=node_credentials())
    assert driver.finish() == batch.EXIT_OK

    out = Outputs(s3=(s3, bucket, prefix))
    records = check_committed(out, by_id(scripts), tmp_path)
    assert record_versions(s3, bucket, prefix) == {vid: 1 for vid in records}, "each record written once"
    nodes = {r["replica"]["node_id"] for r in records.values()}
    assert first.node_id in nodes and nodes <= {first.node_id, joined.node_id, third.node_id}
    lost = records[busy["video"]]
    assert lost["replica"]["node_id"] != joined.node_id and lost["attempts"] >= 2, "re-rendered elsewhere"
    summary = out.summary()
    assert (summary["committed"], summary["failed"], summary["rejected_input"]) == (len(scripts), 0, 0)
    assert summary["replicas_served"] >= 2 and summary["plan"]["replicas"] == 3


def test_auto_device_requests_gpu_replicas_when_the_autoscaler_can_add_gpu_nodes(ray_cluster, tmp_path):
    """GPU workers at zero: the cluster has no GPU now, but its autoscaler (here: the config
    it publishes to the GCS) can add 4. The job asks for GPU replicas rather than falling
    back to one CPU replica; none comes up within --start-timeout, so it ends: exit 2, one
    line, summary.json."""
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu", min_count=0, max_count=4)
    group.resources.update({"CPU": 4, "GPU": 1})
    ray._private.worker.global_worker.gcs_client.report_cluster_config(config.SerializeToString())
    assert ray.cluster_resources().get("GPU", 0) == 0
    manifest = tmp_path / "scripts.jsonl"
    manifest.write_text("".join(json.dumps(s) + "\n" for s in long_scripts("auto", 6)))
    out = tmp_path / "out"
    status = batch.main(["--scripts", str(manifest), "--output", str(out), "--start-timeout", "3"])
    assert status == batch.EXIT_FAILED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"]["device"] == "gpu" and summary["plan"]["replicas"] == 4
    assert summary["status"] == "failure" and "no replica came up (4 waiting" in summary["error"]
    assert "within 3 s" in summary["error"] and summary["committed"] == 0


def test_replicas_use_their_nodes_credentials_not_the_drivers(ray_cluster, s3_server, s3_bucket, tmp_path, capfd):
    """The driver can reach S3, the GPU node cannot (no credentials in its environment, no
    role): the replica fails to start and says why; the job ends with exit 2 and one line."""
    ray_cluster.add_node(env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                              "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                              "AWS_EC2_METADATA_DISABLED": "true"})
    manifest = tmp_path / "scripts.jsonl"
    manifest.write_text("".join(json.dumps(s) + "\n" for s in long_scripts("nocred", 2)))
    prefix = f"nocred-{uuid.uuid4().hex[:8]}"
    status = batch.main(["--scripts", str(manifest), "--output", f"s3://{s3_bucket}/{prefix}", "--endpoint-url",
                         s3_server, "--replicas", "1", "--replica-resources", GPU, "--preset", "tiny"])
    assert status == batch.EXIT_FAILED
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("failure: no replica could serve: ReplicaStartError: replica 0 could not start on ")
    assert "NoCredentialsError: Unable to locate credentials" in last and "re-run the same command" in last
    summary = Outputs(s3=(boto3.client("s3", endpoint_url=s3_server), s3_bucket, prefix)).summary()
    assert summary["exit_status"] == 2 and "NoCredentialsError" in summary["error"]
    assert summary["committed"] == 0 and summary["replicas_served"] == 0


def test_auto_device_reads_the_cluster_launchers_config_on_the_head(ray_client, tmp_path, monkeypatch):
    """On a head started by `ray up infra/cluster.yaml` the launcher leaves its config in
    ~/ray_bootstrap_config.yaml: its GPU workers (0 now, up to 8) count as capacity."""
    import shutil

    from cluster.pool import capacity

    assert capacity("GPU") == 0
    shutil.copy(REPO / "infra" / "cluster.yaml", tmp_path / "ray_bootstrap_config.yaml")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert capacity("GPU") == 8
    args = batch.parse_args(["--device", "auto"]).settings
    assert batch.plan_replicas(args, scripts=100) == (True, 1, 8)
    assert batch.plan_replicas(args, scripts=3) == (True, 1, 3), "no more replicas than scripts"
    assert batch.plan_replicas(batch.parse_args(["--min-replicas", "2", "--max-replicas", "5"]).settings, 100) == (True, 2, 5)
    assert batch.plan_replicas(batch.parse_args(["--device", "cpu"]).settings, 100) == (False, 1, 1)
