"""The Ray batch layer end to end: a real head on 127.0.0.1 (tests/ray_cluster.py), real
actors, the Jobs CLI, S3 through moto, mp4 files read back with PyAV.

Jobs run on the tiny preset with 1-2 s segments, so a script renders in about a
second; most of a test's time is actors starting (torch import, a few seconds)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
import ray
import torch

from cluster.dataset import DatasetIndex
from cluster.memory_service import MemoryServiceClient, VideoStateLost, shard_for, start_shards
from cluster.storage import STORAGE_ENV, Storage
from jobs import batch
from memflow.config import PRESETS
from memflow.memory import InProcessRanker
from memflow.pipeline import MemFlowGenerator
from memflow.script import canonical, parse_script
from memflow.video import probe_mp4

from .conftest import SECRET_KEY

REPO = Path(__file__).resolve().parent.parent


def seg(prompt: str, seconds: float = 2) -> dict:
    return {"prompt": prompt, "seconds": seconds}


def write_manifest(path: Path, lines: list) -> Path:
    """Lines: dicts (JSON), str (as is) or bytes (raw); one a line."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


def by_id(scripts: list[dict]) -> dict[str, dict]:
    """video id -> script."""
    return {parse_script(s).video_id: s for s in scripts}


class Outputs:
    """An output prefix read back: local directory or S3 through boto3."""

    def __init__(self, root: Path | None = None, s3: tuple | None = None):
        self.root, self.s3 = root, s3

    def read(self, key: str) -> bytes:
        if self.root is not None:
            return (self.root / key).read_bytes()
        client, bucket, prefix = self.s3
        return client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()

    def keys(self, folder: str) -> list[str]:
        if self.root is not None:
            base = self.root / folder
            return sorted(p.name for p in base.iterdir()) if base.is_dir() else []
        client, bucket, prefix = self.s3
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{folder}/")
        return sorted(o["Key"].rsplit("/", 1)[-1] for page in pages for o in page.get("Contents", []))

    def json(self, key: str):
        return json.loads(self.read(key))

    def records(self) -> dict[str, dict]:
        return {name.removesuffix(".json"): self.json(f"records/{name}") for name in self.keys("records")}

    def table(self, folder: str, version: int | None = None) -> list[dict]:
        """The rows of a dataset table (manifest/ or metrics/), through its Delta log."""
        return self.index().read(folder, version)

    def index(self) -> DatasetIndex:
        if self.root is not None:
            return DatasetIndex(Storage(str(self.root)))
        client, bucket, prefix = self.s3
        return DatasetIndex(Storage(f"s3://{bucket}/{prefix}", client.meta.endpoint_url), client.meta.endpoint_url)

    def errors(self) -> list[dict]:
        return [json.loads(line) for line in self.read("errors.jsonl").decode().splitlines()]

    def summary(self) -> dict:
        return self.json("summary.json")


def check_committed(out: Outputs, scripts: dict[str, dict], tmp_path: Path) -> dict[str, dict]:
    """Every script has its mp4 (frames read back = record = plan), its record and
    exactly one manifest and metrics row, with per-segment frame ranges and prompts."""
    records = out.records()
    assert set(records) == set(scripts)
    manifest = out.table("manifest")
    assert sorted(r["id"] for r in manifest) == sorted(scripts)
    assert sorted(r["id"] for r in out.table("metrics")) == sorted(scripts)
    rows = {r["id"]: r for r in manifest}
    for vid, line in scripts.items():
        script, record, row = parse_script(line), records[vid], rows[vid]
        plan = script.plan()
        local = tmp_path / f"readback-{uuid.uuid4().hex}.mp4"
        local.write_bytes(out.read(f"videos/{vid}.mp4"))
        info = probe_mp4(local)
        local.unlink()
        assert info["frames"] == record["num_frames"] == plan.num_video_frames == 1 + 4 * (plan.num_latent_frames - 1)
        height, width = script.resolution or (64, 64)
        assert (info["height"], info["width"], round(info["fps"])) == (height, width, script.fps)
        assert record["id"] == row["id"] == vid and record["video"] == row["video"] == f"videos/{vid}.mp4"
        assert row["num_frames"] == record["num_frames"]
        segments = [(s.prompt, s.video_start, s.video_end) for s in plan.segments]
        assert [(s["prompt"], s["start_frame"], s["end_frame"]) for s in record["segments"]] == segments
        assert [(s["prompt"], s["start_frame"], s["end_frame"]) for s in row["segments"]] == segments
        assert row["prompts"] == [s.prompt for s in script.segments]
        assert segments[-1][2] == record["num_frames"]  # the last segment ends at the last frame
        assert record["script"] == canonical(script)
    return records


def run_driver(*argv: str) -> int:
    """jobs/batch.py's main() in this process (connected to the head by `ray_client`)."""
    return batch.main([*argv, "--preset", "tiny"])


class Driver(threading.Thread):
    """The job's driver in a thread of this process, so the test can act on the cluster
    while it runs; `finish` waits for it, bounded."""

    def __init__(self, *argv: str):
        super().__init__(daemon=True)
        self.argv = [*argv, "--preset", "tiny"]
        self.status: int | None = None
        self.error: BaseException | None = None

    def run(self):
        try:
            self.status = batch.run(batch.parse_args(self.argv))
        except BaseException as e:  # surfaced by finish()
            self.error = e

    def finish(self, timeout: float = 600) -> int:
        self.join(timeout)
        assert not self.is_alive(), "the job did not end"
        assert self.error is None, self.error
        return self.status


def wait_for(what: str, check, timeout: float = 300, driver: Driver | None = None):
    """Poll `check()` (bounded) until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver is not None and not driver.is_alive():
            raise AssertionError(f"the job ended before {what}")
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- end to end through the Jobs CLI ---------------------------------------------------

GOOD = [
    {"prompts": ["A paper boat floats down a rain-filled gutter.", "The boat drifts into a wide river."]},
    {"id": "fox", "seed": 2, "segments": [seg("A red fox trots across a snowy meadow."),
                                          seg("The fox pounces into the snow after a mouse.")]},
    {"id": "market", "seed": 4, "resolution": [48, 80], "fps": 8,
     "segments": [seg("A night market, lanterns glowing.", 1.5), seg("A cook flips noodles.", 1.5),
                  seg("The lanterns go out one by one.", 1.5)]},
    {"seed": 5, "segments": [seg("A lighthouse at dusk.", 1), seg("Its beam sweeps a stormy sea.", 1)]},
]


def test_jobs_cli_end_to_end_with_bad_lines(ray_head, tmp_path):
    lines = [GOOD[0], '{"prompts": ["unterminated"', GOOD[1], {"segments": [seg("   ")]}, "",
             GOOD[2], {"prompts": ["a cat"], "colour": "red"}, b"\x00\x01binary\xff\xfe\x00", GOOD[3]]
    bad = {2: "invalid JSON", 4: "prompt is empty", 7: "unknown field", 8: "binary"}  # line 5 is blank: skipped
    manifest = write_manifest(tmp_path / "scripts.jsonl", lines)
    out_dir = tmp_path / "out"
    sub_id = f"memflow-test-{uuid.uuid4().hex[:8]}"
    # --working-dir uploads the checkout; Ray 2.60 leaves out .git, .venv, venv and
    # __pycache__ by default and honours .gitignore/.rayignore (so outputs/ stays home too).
    # a YAML job file, as Ray users keep them, with overrides on the command line
    job = tmp_path / "job.yaml"
    job.write_text(f"scripts: {manifest}\noutput: {out_dir}\npreset: tiny\nreplicas: 3\nmemory: off\n")
    result = ray_head.job_cli("submit", "--submission-id", sub_id, "--working-dir", str(REPO), "--",
                              "python", "jobs/batch.py", "--config", str(job), "--replicas", "1", "--memory", "nam",
                              timeout=400)
    logs = result.stdout + result.stderr
    assert result.returncode != 0, logs  # the job failed: partial success is exit status 1
    status = ray_head.job_cli("status", sub_id, timeout=60)
    assert "Job entrypoint command failed with exit code 1" in status.stdout + status.stderr
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(ray_head.dashboard_url).get_job_info(sub_id)
    assert info.driver_exit_code == batch.EXIT_PARTIAL, logs
    assert "partial success: 4 committed, 0 already done, 0 failed, 4 rejected input line(s)" in logs
    # replicas are built from plain values (shards by name), so Ray has no reason to warn that
    # a restart could fail for lack of constructor arguments held in the object store
    assert "constructor arguments in the object store" not in logs

    out = Outputs(out_dir)
    scripts = by_id(GOOD)
    assert len(scripts) == 4
    check_committed(out, scripts, tmp_path)
    errors = out.errors()
    assert {e["line"]: e["reason"] for e in errors}.keys() == bad.keys()
    for e in errors:
        assert bad[e["line"]] in e["reason"], e
    summary = out.summary()
    assert (summary["committed"], summary["skipped_already_committed"], summary["failed"],
            summary["rejected_input"], summary["dataset_rows"]) == (4, 0, 0, 4, 4)
    assert summary["frames"] == sum(parse_script(s).plan().num_video_frames for s in scripts.values())
    assert summary["plan"]["replicas"] == 1
    config, sources = summary["config"], summary["config_sources"]
    assert (config["replicas"], config["memory"], config["preset"], config["crf"]) == (1, "nam", "tiny", 18)
    assert (sources["replicas"], sources["memory"], sources["preset"], sources["crf"]) == \
        ("command line", "command line", "file", "default")
    record = out.records()[next(iter(scripts))]
    assert record["config"]["memory"] == "nam" and record["config"]["device"] == "cpu"


# -- s3:// through moto ------------------------------------------------------------------

def test_s3_manifest_and_output(ray_client, s3_server, s3_bucket, tmp_path, monkeypatch, capfd):
    """Manifest and outputs on S3, endpoint and credentials from the driver's environment
    only: the head's processes have neither, so the replicas get them from the driver."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    prefix = f"job-{uuid.uuid4().hex[:8]}"
    scripts = [{"id": "s3-fox", "seed": 1, "segments": [seg("A fox in the snow."), seg("The fox sleeps.", 1)]},
               {"prompts": ["A boat on a river."], "fps": 4}]
    s3.put_object(Bucket=s3_bucket, Key=f"{prefix}/scripts.jsonl",
                  Body=b"".join(json.dumps(s).encode() + b"\n" for s in scripts))
    status = run_driver("--scripts", f"s3://{s3_bucket}/{prefix}/scripts.jsonl",
                        "--output", f"s3://{s3_bucket}/{prefix}/run/", "--replicas", "1")
    out = Outputs(s3=(s3, s3_bucket, f"{prefix}/run"))
    assert status == batch.EXIT_OK, out.errors()
    records = check_committed(out, by_id(scripts), tmp_path)
    assert all(r["video_url"] == f"s3://{s3_bucket}/{prefix}/run/videos/{vid}.mp4" for vid, r in records.items())
    summary = out.summary()
    assert (summary["committed"], summary["rejected_input"], summary["dataset_rows"]) == (2, 0, 2)
    assert out.errors() == []
    # The secret key reached the replicas but no output, log line or Ray log of the head.
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix=f"{prefix}/run/")
    everything = b"".join(s3.get_object(Bucket=s3_bucket, Key=o["Key"])["Body"].read()
                          for page in pages for o in page.get("Contents", []) if not o["Key"].endswith(".mp4"))
    assert out.read("summary.json") in everything  # every object: records, tables and their logs, summary
    assert SECRET_KEY.encode() not in everything
    captured = capfd.readouterr()
    assert SECRET_KEY not in captured.out + captured.err
    for path in ray_client.temp_dir.rglob("*"):
        if path.is_file() and "logs" in path.parts:
            assert SECRET_KEY.encode() not in path.read_bytes(), path


# -- failures mid-job ----------------------------------------------------------------------

def long_scripts(prefix: str, n: int) -> list[dict]:
    """Scripts of ~20 chunks each (a second or two of CPU), so a kill lands mid-render."""
    return [{"id": f"{prefix}-{i}", "seed": i,
             "segments": [seg(f"{prefix} scene {i}.{j}", 5) for j in range(3)]} for i in range(n)]


class KillMidRender(threading.Thread):
    """Waits (bounded) until a replica of this driver reports chunk >= `at_chunk` of a
    video, then kills the actor that `victim(names)` names; Ray restarts it (max_restarts)."""

    def __init__(self, victim, at_chunk: int = 3, timeout: float = 120):
        super().__init__(daemon=True)
        self.victim, self.at_chunk, self.timeout = victim, at_chunk, timeout
        self.video: str | None = None
        self.error: BaseException | None = None

    def run(self):
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline and self.video is None:
                names = sorted(ray.util.list_named_actors())
                for name in (n for n in names if n.startswith("memflow-replica-")):
                    try:
                        status = ray.get(ray.get_actor(name).status.remote(), timeout=10)
                    except Exception:  # not started yet
                        continue
                    if status.get("video") and status["chunk"] >= self.at_chunk:
                        ray.kill(ray.get_actor(self.victim(names, name)), no_restart=False)
                        self.video = status["video"]
                        return
                time.sleep(0.02)
        except BaseException as e:  # surfaced by the test
            self.error = e


def run_with_kill(tmp_path: Path, scripts: list[dict], victim, *argv: str) -> tuple[int, KillMidRender]:
    manifest = write_manifest(tmp_path / "scripts.jsonl", scripts)
    killer = KillMidRender(victim)
    killer.start()
    status = run_driver("--scripts", str(manifest), "--output", str(tmp_path / "out"), *argv)
    killer.join(30)
    assert killer.error is None and killer.video is not None, "the kill never happened"
    return status, killer


def check_each_committed_once(out: Outputs, scripts: list[dict], tmp_path: Path, killed: str) -> None:
    records = check_committed(out, by_id(scripts), tmp_path)
    assert records[killed]["attempts"] >= 2, "the script in flight was rendered again"
    assert out.keys("videos") == sorted(f"{s['id']}.mp4" for s in scripts)  # nothing half-written left
    summary = out.summary()
    assert (summary["committed"], summary["failed"], summary["dataset_rows"]) == (len(scripts), 0, len(scripts))


def test_killed_replica_mid_job_is_retried_and_each_script_committed_once(ray_client, tmp_path):
    scripts = long_scripts("kill", 4)
    status, killer = run_with_kill(tmp_path, scripts, lambda names, busy: busy, "--replicas", "2")
    assert status == batch.EXIT_OK
    check_each_committed_once(Outputs(tmp_path / "out"), scripts, tmp_path, killer.video)


def test_killed_memory_shard_restarts_and_the_video_is_retried(ray_client, tmp_path):
    scripts = long_scripts("shard", 3)
    shard = lambda names, busy: next(n for n in names if n.startswith("memflow-memory-"))  # noqa: E731
    status, killer = run_with_kill(tmp_path, scripts, shard, "--replicas", "1", "--memory-shards", "1")
    assert status == batch.EXIT_OK
    out = Outputs(tmp_path / "out")
    check_each_committed_once(out, scripts, tmp_path, killer.video)
    record = out.json(f"records/{killer.video}.json")
    assert len(record["retrieval"]["service"]["recorded_frames"]) > 3, "the retry used the restarted shard"


def test_rerun_after_an_interrupted_run_renders_only_what_is_missing(ray_head, tmp_path):
    scripts = long_scripts("resume", 4)
    manifest = write_manifest(tmp_path / "scripts.jsonl", scripts)
    out_dir = tmp_path / "out"
    argv = [sys.executable, "jobs/batch.py", "--scripts", str(manifest), "--output", str(out_dir),
            "--replicas", "1", "--in-flight", "1"]
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address}
    driver = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # interrupt it (SIGKILL: no clean-up at all) once the first script is committed
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not list((out_dir / "records").glob("*.json")):
            assert driver.poll() is None, "the driver ended before it was interrupted"
            time.sleep(0.05)
        driver.kill()
    finally:
        driver.wait(30)
    first = {p.name: p.read_bytes() for p in (out_dir / "records").glob("*.json")}
    assert 1 <= len(first) < len(scripts), "interrupted after some, not all, scripts"
    assert not (out_dir / "summary.json").exists()

    ray.init(address=ray_head.gcs_address, log_to_driver=False)
    try:
        status = run_driver("--scripts", str(manifest), "--output", str(out_dir), "--replicas", "1")
    finally:
        ray.shutdown()
    assert status == batch.EXIT_OK
    out = Outputs(out_dir)
    check_committed(out, by_id(scripts), tmp_path)
    summary = out.summary()
    assert (summary["skipped_already_committed"], summary["committed"]) == (len(first), len(scripts) - len(first))
    for name, data in first.items():  # committed records were not rendered or written again
        assert (out_dir / "records" / name).read_bytes() == data


def test_a_stopped_driver_ends_with_exit_2_and_a_summary_of_what_it_did(ray_head, tmp_path):
    """SIGTERM (what `ray job stop` sends) mid-run: the driver releases its actors, writes
    summary.json with what was committed, says so in one line and exits 2."""
    scripts = long_scripts("stop", 4)
    manifest = write_manifest(tmp_path / "scripts.jsonl", scripts)
    out_dir = tmp_path / "out"
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address}
    driver = subprocess.Popen([sys.executable, "jobs/batch.py", "--scripts", str(manifest), "--output", str(out_dir),
                               "--replicas", "1", "--in-flight", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not list((out_dir / "records").glob("*.json")):
            assert driver.poll() is None, "the driver ended before it was stopped"
            time.sleep(0.05)
        driver.terminate()
        _, stderr = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == batch.EXIT_FAILED, stderr[-5000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("failure: stopped by a signal; re-run the same command to resume (summary: ")
    summary = Outputs(out_dir).summary()
    committed = len(list((out_dir / "records").glob("*.json")))
    assert (summary["status"], summary["exit_status"]) == ("failure", 2) and summary["committed"] <= committed


# -- the memory bank service -------------------------------------------------------------

def test_memory_service_ranks_as_in_process_and_releases_each_video(ray_client):
    gen = MemFlowGenerator.from_preset("tiny")
    shards = start_shards(2, f"test-memory-{uuid.uuid4().hex[:6]}")
    client = MemoryServiceClient(shards)
    try:
        scripts = [parse_script({"id": f"mem-{i}", "seed": i, "segments": [seg(f"a harbour, take {i}", 8),
                                                                           seg("fog rolls in", 8)]})
                   for i in range(4)]
        assert {shard_for(s.video_id, 2) for s in scripts} == {0, 1}, "both shards serve"
        held = []

        def sample(event):
            if event.chunk == event.num_chunks - 1:  # the video is still open on its shard
                held.append(sum(s["bytes"] for s in ray.get([s.stats.remote() for s in shards])))

        for script in scripts:
            remote = gen.generate(script, ranker=client, on_chunk=sample)
            local = gen.generate(script, ranker=InProcessRanker())
            assert torch.equal(remote.latents, local.latents)
            assert remote.trace == local.trace and remote.sma_trace == local.sma_trace
            assert remote.retrieval == local.retrieval and len(remote.retrieval["recorded_frames"]) > 3
            assert remote.retrieval["updates"], "the bank filled up: NAM ranked on the service"
            stats = ray.get([s.stats.remote() for s in shards])
            assert all(s["videos"] == 0 and s["bytes"] == 0 for s in stats), "released when the video ended"
        assert len(held) == len(scripts) and min(held) > 0
    finally:
        for s in shards:
            ray.kill(s)


def test_restarted_shard_refuses_a_video_it_lost(ray_client):
    [shard] = start_shards(1, f"test-memory-{uuid.uuid4().hex[:6]}")
    client = MemoryServiceClient([shard])
    try:
        client.record("v", 0, torch.ones(4, 8), {"chunk": 0})
        assert ray.get(shard.stats.remote())["videos"] == 1
        ray.kill(shard, no_restart=False)  # asynchronous: wait (bounded) until the restarted shard answers
        deadline = time.monotonic() + 60
        while ray.get(shard.stats.remote())["videos"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = ray.get(shard.stats.remote())
        assert (stats["shard"], stats["videos"], stats["bytes"]) == (0, 0, 0)
        with pytest.raises(VideoStateLost):
            client.rank("v", torch.ones(4, 8), [[0]], 1)
    finally:
        ray.kill(shard)


# -- hostile input -------------------------------------------------------------------------

def test_hostile_ids_and_lines_cannot_escape_or_stop_the_job(ray_client, tmp_path):
    ids = ["../../escape", "/etc/passwd", "a b?*<>|:\"'", "..", "видео/../../x", "C:\\Windows\\x"]
    lines = [{"id": i, "seed": n, "prompts": ["a small boat"]} for n, i in enumerate(ids)]
    lines.insert(2, b'{"prompts": ["' + b"x" * (2 << 20) + b'"]}')  # a 2 MiB line
    lines.insert(4, b"\xff\xfe\x00" * 50)
    root = tmp_path / "deep" / "out"
    root.parent.mkdir()
    status = run_driver("--scripts", str(write_manifest(tmp_path / "m.jsonl", lines)), "--output", str(root),
                        "--replicas", "1")
    assert status == batch.EXIT_PARTIAL
    out = Outputs(root)
    records = out.records()
    assert len(records) == len(ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "m.jsonl"]
    assert sorted(p.name for p in root.parent.iterdir()) == ["out"]
    for path in root.rglob("*"):
        assert path.resolve().is_relative_to(root.resolve())
        if path.relative_to(root).parts[0] not in ("manifest", "metrics"):  # the tables have their own log folder
            assert path.parent.parent == root or path.parent == root, path  # one folder deep at most
    assert sorted(r["script"]["id"] for r in records.values()) == sorted(ids)
    errors = out.errors()
    assert sorted(e["line"] for e in errors) == [3, 5]
    assert "longer than" in errors[0]["reason"] and len(json.dumps(errors)) < 10_000


def test_limits_duplicates_and_resume_conflicts_are_reported_with_their_lines(ray_client, tmp_path):
    """Scripts that could never finish, coerced types and lone surrogates are rejected up
    front; an id re-used with other content is reported (in the run and on resume), an
    exact repeat is rendered once. Outputs are readable by the team (not 0600)."""
    boat = {"id": "dup", "seed": 1, "prompts": ["a paper boat"]}
    kite = {"prompts": ["a red kite"], "seed": 3}
    lines = [boat, {**boat, "seed": 2}, boat, kite, kite,
             {"segments": [seg("a night that never ends", 1e9)]},
             {"prompts": ["a"], "resolution": [2**70, 16]},
             '{"prompts": ["a fox \\ud83e in the snow"]}',
             {"prompts": ["a"], "fps": "16"},
             {"segments": [{"prompt": "a", "seconds": True}]}]
    manifest = write_manifest(tmp_path / "scripts.jsonl", lines)
    out_dir = tmp_path / "out"
    driver = Driver("--scripts", str(manifest), "--output", str(out_dir), "--replicas", "1")
    driver.start()
    assert driver.finish(600) == batch.EXIT_PARTIAL
    out = Outputs(out_dir)
    check_committed(out, by_id([boat, kite]), tmp_path)
    reasons = {e["line"]: e["reason"] for e in out.errors()}
    expected = {2: "duplicate id 'dup': line 1 has it with different content",
                6: "seconds: the segments add up to 1e+09 s", 7: "resolution: 1180591620717411303424x16",
                8: "segments.0.prompt: prompt is not valid Unicode text: lone surrogate",
                9: "fps: Input should be a valid integer, got str", 10: "segments.0.seconds: Input should be a valid"}
    assert reasons.keys() == expected.keys()
    for n, text in expected.items():
        assert text in reasons[n], (n, reasons[n])
    summary = out.summary()
    assert (summary["committed"], summary["skipped_repeated_lines"], summary["rejected_input"],
            summary["skipped_already_committed"]) == (2, 2, 6, 0)
    for path in out_dir.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o044 == 0o044, f"{path} is not readable by group and others"

    # resume: the same id with other content is reported, not taken for done; an exact repeat is
    resumed = write_manifest(tmp_path / "again.jsonl", [{**boat, "seed": 9}, kite])
    assert run_driver("--scripts", str(resumed), "--output", str(out_dir), "--replicas", "1") == batch.EXIT_PARTIAL
    [error] = out.errors()
    assert error["line"] == 1 and "'dup' was committed by an earlier run with different content" in error["reason"]
    summary = out.summary()
    assert (summary["committed"], summary["skipped_already_committed"], summary["rejected_input"]) == (0, 1, 1)
    assert out.records()["dup"]["seed"] == 1, "the committed video was left alone"


def test_a_replica_that_hangs_is_restarted_and_its_script_retried(ray_head, tmp_path):
    """MEMFLOW_TEST_HANG (test-only, cluster/replica.py) makes a render hang after its first
    chunk: hang-0 on its first attempt only, hang-1 on every attempt. The stall watchdog
    restarts the replica each time; hang-0 is committed on its retry, hang-1 fails after
    its attempts with the reason, the rest is committed."""
    scripts = long_scripts("hang", 3)
    manifest = write_manifest(tmp_path / "scripts.jsonl", scripts)
    ray.init(address=ray_head.gcs_address, log_to_driver=False,
             runtime_env={"env_vars": {"MEMFLOW_TEST_HANG": "hang-0:1,hang-1"}})
    try:
        driver = Driver("--scripts", str(manifest), "--output", str(tmp_path / "out"), "--replicas", "1",
                        "--stall-timeout", "8", "--max-attempts", "2")
        driver.start()
        status = driver.finish(600)
    finally:
        ray.shutdown()
    assert status == batch.EXIT_PARTIAL
    out = Outputs(tmp_path / "out")
    records = check_committed(out, {"hang-0": scripts[0], "hang-2": scripts[2]}, tmp_path)
    # hang-0's first render either hangs (charged to it) or is ended before it starts by the
    # restart for hang-1's hang (charged to no one); either way it is rendered again
    failures = records["hang-0"]["failures"]
    assert failures["attempts"] <= 1 and failures["replica_deaths"] == 0, failures
    assert records["hang-0"]["attempts"] >= max(2, 1 + sum(failures.values())), failures
    [error] = out.errors()
    assert error["id"] == "hang-1" and error["reason"] == "failed after 2 attempt(s)"
    assert len(error["attempts"]) == 2
    assert all(a.startswith("stalled: no progress for") and "at generate of hang-1" in a for a in error["attempts"])
    assert out.summary()["failed"] == 1


def test_an_unexpected_error_ends_with_exit_2_one_line_and_a_summary(s3_server, s3_bucket, tmp_path):
    """No credentials where the driver runs: exit 2, a last line that says what to do, no
    traceback, and summary.json in the output (or, if that is what cannot be reached,
    a local file the line names)."""
    env = {k: v for k, v in os.environ.items() if k not in STORAGE_ENV}
    env.update(AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_EC2_METADATA_DISABLED="true")

    def driver(*argv):
        run = subprocess.run([sys.executable, "jobs/batch.py", "--endpoint-url", s3_server, *argv], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        return run.returncode, run.stderr.strip().splitlines()[-1], run.stderr

    status, last, stderr = driver("--scripts", f"s3://{s3_bucket}/any/scripts.jsonl", "--output", str(tmp_path / "o"))
    assert status == batch.EXIT_FAILED and "Traceback" not in stderr
    assert last.startswith("failure: no object storage credentials (NoCredentialsError: Unable to locate credentials)")
    assert "instance role or service account" in last and last.endswith(f"(summary: file://{tmp_path}/o/summary.json)")
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (summary["status"], summary["exit_status"], summary["committed"]) == ("failure", 2, 0)
    assert "NoCredentialsError" in summary["error"]

    manifest = write_manifest(tmp_path / "m.jsonl", [GOOD[0]])
    status, last, _ = driver("--scripts", str(manifest), "--output", f"s3://{s3_bucket}/unreachable")
    assert status == batch.EXIT_FAILED and last.startswith("failure: no object storage credentials")
    local = last.rsplit("(summary: ", 1)[1].rstrip(")")
    assert json.loads(Path(local).read_text())["exit_status"] == 2
    Path(local).unlink()
