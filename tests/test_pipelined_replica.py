"""A replica overlaps scripts: while one generates, the one before it finishes (decode,
encode, upload, commit); a failure while finishing costs that script only."""
from __future__ import annotations

import json

import pytest
import ray

from cluster.replica import GeneratorReplica, record_path, video_path
from cluster.settings import ReplicaSettings
from memflow.video import probe_mp4


def _script(name: str, seconds: float = 4.5) -> dict:
    return {"id": name, "seed": 1, "segments": [{"prompt": f"{name}: a harbour at dawn", "seconds": seconds / 2},
                                                {"prompt": f"{name}: fog rolls in", "seconds": seconds / 2}]}


def _replica(output, pipelined: bool):
    config = ReplicaSettings(output=str(output), preset="tiny", device="cpu", pipelined=pipelined)
    return GeneratorReplica.options(num_cpus=1).remote(config, None, 0)


@pytest.mark.parametrize("pipelined", [True, False])
def test_next_script_generates_while_the_last_one_finishes(ray_client, tmp_path, pipelined):
    replica = _replica(tmp_path / "out", pipelined)
    try:
        refs = [replica.render.remote({"script": _script(n)}, n, 1) for n in ("a", "b", "c")]
        records = {r["records"][0]["id"]: r["records"][0] for r in ray.get(refs, timeout=600)}
    finally:
        ray.kill(replica)
    # in the order they got the GPU (two calls run at once: either may take it first)
    a, b, c = sorted((r["timeline"] for r in records.values()), key=lambda t: t["generate_start"])
    for first, second in ((a, b), (b, c)):
        assert second["generate_start"] >= first["generate_end"], "one script generates at a time"
        if pipelined:
            assert second["generate_start"] < first["committed"], "the next one started before this one committed"
        else:
            assert second["generate_start"] >= first["committed"], "serial: the next one waits for the commit"
    for n, record in records.items():  # what was committed is whole: every frame decoded and encoded
        assert probe_mp4(tmp_path / "out" / video_path(n))["frames"] == record["num_frames"] > 0
        assert record["timings"]["generate_wall_s"] >= record["timings"]["generate_s"] > 0


def test_a_failed_upload_fails_that_script_and_nothing_else(ray_client, tmp_path):
    out = tmp_path / "out"
    (out / video_path("a")).mkdir(parents=True)  # a folder where a's video would go: its upload fails
    replica = _replica(out, pipelined=True)
    try:
        refs = {n: replica.render.remote({"script": _script(n)}, n, 1) for n in ("a", "b")}
        with pytest.raises(ray.exceptions.RayTaskError):
            ray.get(refs["a"], timeout=600)
        [record] = ray.get(refs["b"], timeout=600)["records"]
        assert record["id"] == "b" and (out / record_path("b")).exists()
        assert not (out / record_path("a")).exists(), "no record for a script whose video did not land"
        assert json.loads((out / record_path("b")).read_text())["num_frames"] == record["num_frames"]
        status = ray.get(replica.status.remote(), timeout=60)
        assert status["video"] is None and status["finishing"] is None, "the replica is idle again"
    finally:
        ray.kill(replica)
