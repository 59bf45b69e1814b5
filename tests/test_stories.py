"""Stories through the batch job on a real Ray head: trees and continuations render every
video identical to its flattened script rendered flat in another run, records and the
dataset say how each video's chunks were obtained, a half-done tree resumes, a killed
long render resumes from its checkpoint, and bad story lines are reported one by one."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from jobs import batch
from memflow.script import parse_script

from .readme import run_block
from .test_batch_job import KillMidRender, Outputs, run_driver, seg, write_manifest

TREE = {"id": "trunk", "seed": 8, "segments": [seg("a lighthouse at dusk", 1.5), seg("a storm gathers", 1)],
        "branches": [
            {"id": "storm", "segments": [seg("lightning strikes the tower", 1.5)],
             "branches": [{"id": "wreck", "segments": [seg("a ship runs aground", 1)]},
                          {"id": "rescue", "segments": [{"prompt": "boats come out", "seconds": 1, "seed": 4}]}]},
            {"id": "calm", "video": False, "segments": [seg("the storm passes", 1)],
             "branches": [{"id": "dawn", "segments": [seg("dawn over a calm sea", 1.25)]}]}]}
# a continuation of a tree node, before the tree in the manifest (it waits for its parent),
# and a continuation of that continuation, which branches
AFTER = {"id": "after", "continues": "wreck", "segments": [seg("the crew swims ashore", 1.5)]}
LATER = {"id": "later", "continues": "after", "segments": [seg("a bonfire on the beach", 1)],
         "branches": [{"id": "later-rain", "segments": [seg("rain puts out the fire", 1)]}]}


def latents(out: Outputs, vid: str) -> torch.Tensor:
    return load(out.read(f"latents/{vid}.safetensors"))["latents"]


def flattened(records: dict) -> list[dict]:
    """Every committed video as a plain script: what it must equal when rendered alone."""
    return [{**r["script"], "id": vid} for vid, r in records.items()]


@pytest.fixture(scope="module")
def story_run(ray_head, tmp_path_factory):
    import ray

    tmp = tmp_path_factory.mktemp("stories")
    ray.init(address=ray_head.gcs_address, log_to_driver=False)
    try:
        manifest = write_manifest(tmp / "stories.jsonl", [AFTER, TREE, LATER])
        status = run_driver("--scripts", str(manifest), "--output", str(tmp / "out"), "--save-latents",
                            "--replicas", "1", "--memory-shards", "1", "--crf", "0")
        assert status == batch.EXIT_OK
        out = Outputs(tmp / "out")
        records = out.records()
        flat = write_manifest(tmp / "flat.jsonl", flattened(records))
        status = run_driver("--scripts", str(flat), "--output", str(tmp / "flat"), "--save-latents",
                            "--replicas", "1", "--memory-shards", "0", "--crf", "0")
        assert status == batch.EXIT_OK
        yield tmp, out, records, Outputs(tmp / "flat")
    finally:
        ray.shutdown()


def test_every_video_of_a_story_equals_its_flat_render(story_run):
    _, out, records, flat = story_run
    assert sorted(records) == ["after", "dawn", "later", "later-rain", "rescue", "storm", "trunk", "wreck"]
    for vid, record in records.items():
        assert torch.equal(latents(out, vid), latents(flat, vid)), vid
        alone = flat.json(f"records/{vid}.json")
        assert record["num_frames"] == alone["num_frames"] and record["script_sha256"] == alone["script_sha256"]
        # on a CPU the last bits depend on the thread count, which the record keeps: replicas run with 1
        assert record["replica"]["cpu_threads"] == alone["replica"]["cpu_threads"] == 1
        assert record["retrieval"]["bank_trace"] == alone["retrieval"]["bank_trace"], vid
        # lossless: the same pixels, frame for frame (the shared frames were decoded once)
        assert out.read(f"videos/{vid}.mp4") == flat.read(f"videos/{vid}.mp4") or \
            _frames(out, vid) == _frames(flat, vid), vid


def _frames(out: Outputs, vid: str) -> list[bytes]:
    import av

    with av.open(io.BytesIO(out.read(f"videos/{vid}.mp4"))) as c:
        return [f.to_ndarray(format="rgb24").tobytes() for f in c.decode(video=0)]


def test_records_and_the_dataset_say_how_each_video_was_obtained(story_run):
    tmp, out, records, _ = story_run
    story = {vid: r["story"] for vid, r in records.items()}
    assert story["trunk"] == {"root": "trunk", "parent": None, "fork_chunk": None, "prefix": None,
                              "chunks": {"shared": records["trunk"]["num_chunks"], "replayed": 0, "generated": 0}}
    assert story["storm"]["parent"] == "trunk" and story["storm"]["prefix"] == "shared"
    assert story["dawn"]["parent"] == "calm", "a node without a video is still the parent"
    n = {vid: r["num_chunks"] for vid, r in records.items()}
    # storm's chunks are shared by storm, wreck and rescue; calm has no video, so dawn's own start is its alone
    for vid, shared in (("storm", n["storm"]), ("wreck", n["storm"]), ("rescue", n["storm"]), ("dawn", n["trunk"])):
        assert story[vid]["root"] == "trunk" and story[vid]["chunks"] == {
            "shared": shared, "replayed": 0, "generated": n[vid] - shared}, vid
    assert story["after"]["root"] == "trunk" and story["after"]["parent"] == "wreck"
    assert story["after"]["prefix"] == "replayed" and story["after"]["fork_chunk"] == records["wreck"]["num_chunks"]
    assert story["after"]["chunks"]["replayed"] == records["wreck"]["num_chunks"]
    assert story["later"]["chunks"]["replayed"] == records["after"]["num_chunks"]
    assert story["later-rain"]["parent"] == "later" and story["later-rain"]["root"] == "trunk"
    assert story["later-rain"]["chunks"]["replayed"] == records["after"]["num_chunks"]
    for vid, s in story.items():
        assert sum(s["chunks"].values()) == records[vid]["num_chunks"], vid
    summary = out.summary()
    assert summary["chunks"]["in_videos"] == sum(r["num_chunks"] for r in records.values())
    assert summary["chunks"]["generated"] < summary["chunks"]["in_videos"] / 2, summary["chunks"]
    # the README's query: a story's variants
    rows = run_block("story_root", {"outputs/": f"{tmp}/out/", "'lighthouse'": "'trunk'"})["variants"]
    assert [r[0] for r in rows] == ["after", "dawn", "later", "later-rain", "rescue", "storm", "trunk", "wreck"]
    assert ("after", "wreck", "replayed", 0, records["wreck"]["num_chunks"]) in rows
    assert not out.keys("state"), "checkpoints are deleted once a story commits"


def test_the_dataset_reads_as_the_readme_says(story_run, ray_client):
    tmp, out, records, _ = story_run
    scope = run_block("to_pandas", {"outputs/": f"{tmp}/out/"})
    assert sorted(scope["df"]["id"]) == sorted(records)
    assert scope["videos"].count() == len(records) and len(scope["first"]) <= len(records)


def test_a_continuation_without_saved_latents_regenerates_the_same_video(story_run, ray_client):
    tmp, out, records, flat = story_run
    plain = tmp / "plain"
    manifest = write_manifest(tmp / "plain.jsonl", [{**TREE, "branches": []}])
    assert run_driver("--scripts", str(manifest), "--output", str(plain), "--replicas", "1") == batch.EXIT_OK
    more = write_manifest(tmp / "more.jsonl", [{"id": "more", "continues": "trunk",
                                                "segments": [seg("a storm gathers", 1)]}])
    assert run_driver("--scripts", str(more), "--output", str(plain), "--replicas", "1",
                      "--save-latents") == batch.EXIT_OK
    record = Outputs(plain).json("records/more.json")
    assert record["story"]["prefix"] == "regenerated" and record["story"]["chunks"]["replayed"] == 0
    # the same content as the tree's trunk followed by a 1 s segment: compare with a flat render of it
    alone = write_manifest(tmp / "alone.jsonl", [{**record["script"], "id": "more"}])
    assert run_driver("--scripts", str(alone), "--output", str(tmp / "alone"), "--replicas", "1",
                      "--save-latents") == batch.EXIT_OK
    assert torch.equal(latents(Outputs(plain), "more"), latents(Outputs(tmp / "alone"), "more"))


def test_a_half_done_tree_renders_only_what_is_missing(story_run, ray_client):
    tmp, out, records, _ = story_run
    root = tmp / "out"
    for vid in ("storm", "rescue"):
        (root / "records" / f"{vid}.json").unlink()
    manifest = write_manifest(tmp / "again.jsonl", [AFTER, TREE, LATER])
    assert run_driver("--scripts", str(manifest), "--output", str(root), "--save-latents", "--replicas", "1",
                      "--crf", "0") == batch.EXIT_OK
    summary = out.summary()
    assert (summary["committed"], summary["skipped_already_committed"]) == (2, 6)
    again = out.records()
    for vid in ("storm", "rescue"):
        assert again[vid]["committed_at"] >= records[vid]["committed_at"]
        assert again[vid]["script_sha256"] == records[vid]["script_sha256"]
    assert again["wreck"] == records["wreck"], "a committed node is left as it is"
    storm, rescue = again["storm"], again["rescue"]
    assert storm["story"]["chunks"] == {"shared": storm["num_chunks"], "replayed": 0, "generated": 0}
    assert rescue["story"]["chunks"]["generated"] == rescue["num_chunks"] - storm["num_chunks"]
    assert torch.equal(latents(out, "rescue"), latents(story_run[3], "rescue"))


def test_a_killed_long_render_resumes_from_its_checkpoint(ray_client, tmp_path):
    script = {"id": "epic", "seed": 3, "segments": [seg(f"chapter {i}", 4) for i in range(3)]}  # 16 chunks
    manifest = write_manifest(tmp_path / "epic.jsonl", [script])
    killer = KillMidRender(lambda names, busy: busy, at_chunk=12)
    killer.start()
    status = run_driver("--scripts", str(manifest), "--output", str(tmp_path / "out"), "--replicas", "1",
                        "--save-latents", "--checkpoint-seconds", "0.2")
    killer.join(30)
    assert killer.error is None and killer.video == "epic" and status == batch.EXIT_OK
    out = Outputs(tmp_path / "out")
    record = out.json("records/epic.json")
    failures = record["failures"]  # the kill (and any render the restart ended): never the script's own
    assert failures["attempts"] == 0 and record["attempts"] >= max(2, 1 + sum(failures.values())), failures
    assert record["story"]["prefix"] == "resumed"
    replayed, generated = record["story"]["chunks"]["replayed"], record["story"]["chunks"]["generated"]
    assert replayed >= 8 and replayed + generated == record["num_chunks"], record["story"]
    assert not out.keys("state"), "the checkpoint went with the commit"
    assert run_driver("--scripts", str(manifest), "--output", str(tmp_path / "whole"), "--replicas", "1",
                      "--save-latents") == batch.EXIT_OK
    assert torch.equal(latents(out, "epic"), latents(Outputs(tmp_path / "whole"), "epic"))


def test_bad_story_lines_are_reported_each_with_its_reason(ray_client, tmp_path):
    out = tmp_path / "out"
    parent = write_manifest(tmp_path / "parent.jsonl", [{"id": "p-off", "segments": [seg("a fox", 1)]}])
    assert run_driver("--scripts", str(parent), "--output", str(out), "--replicas", "1", "--memory", "off") == 0
    deep = {"id": "d0", "segments": [seg("x", 0.25)]}
    node = deep
    for i in range(1, 34):
        node["branches"] = [{"id": f"d{i}", "segments": [seg("x", 0.25)]}]
        node = node["branches"][0]
    lines = [
        {"id": "ok", "segments": [seg("a good one", 1)], "branches": [{"id": "ok-b", "segments": [seg("on", 1)]}]},
        {"id": "t1", "segments": [seg("a", 1)], "branches": [{"id": "t1", "segments": [seg("b", 1)]}]},
        {"id": "t2", "segments": [seg("a", 1)], "branches": [{"id": "ok-b", "segments": [seg("c", 1)]}]},
        {"id": "t3", "segments": [seg("a", 1)], "branches": [{"id": "t3-b", "segments": []}]},
        {"id": "t4", "segments": [seg("a", 1)], "branches": [{"id": "t4-b", "segments": [seg("b", 1)], "fps": 8}]},
        {"id": "c1", "continues": "p-off", "segments": [seg("b", 1)], "colour": "red"},
        {"id": "t5", "segments": [seg("a", 300)], "branches": [{"id": "t5-b", "segments": [seg("b", 301)]}]},
        {"id": "t6", "segments": [seg("a", 1)], "branches": [{"id": f"t6-{i}", "segments": [seg("b", 1)]}
                                                             for i in range(4)]},
        deep,
        {"id": "c2", "continues": "c3", "segments": [seg("b", 1)]},
        {"id": "c3", "continues": "c2", "segments": [seg("b", 1)]},
        {"id": "c4", "continues": "../../etc/x", "segments": [seg("b", 1)]},
        {"id": "c5", "continues": "nobody", "segments": [seg("b", 1)]},
        {"id": "c6", "continues": "p-off", "segments": [seg("b", 1)]},
    ]
    manifest = write_manifest(tmp_path / "bad.jsonl", lines)
    status = run_driver("--scripts", str(manifest), "--output", str(out), "--replicas", "1", "--max-branches", "4")
    assert status == batch.EXIT_PARTIAL
    o = Outputs(out)
    reasons = {e["line"]: e["reason"] for e in o.errors()}
    expected = {2: "branches.0.id: duplicate id 't1'", 3: "duplicate id 'ok-b': line 1 has it too",
                4: "branches.0.segments: needs at least one segment", 5: "branches.0.fps: unknown field",
                6: "colour: unknown field", 7: "branch 't5-b': the segments add up to 601 s",
                8: "the script has 5 nodes", 9: "nest 33 deep; at most 32",
                10: "continues: a cycle c2 -> c3 -> c2", 11: "continues: a cycle c3 -> c2 -> c3",
                12: "'../../etc/x' is not a video id of this output", 13: "no committed video 'nobody'",
                14: "was rendered with memory 'off', this job renders memory 'nam'"}
    assert reasons.keys() == expected.keys(), reasons
    for line, text in expected.items():
        assert text in reasons[line], (line, reasons[line])
    assert {"ok", "ok-b"} <= set(o.records()), "the good line was rendered"
    assert not (out / "etc").exists() and not Path(tmp_path / "etc").exists()
