"""Story state as a value (memflow/story.py, memflow/tree.py): trees render every node
identical to its flattened script alone, forks are independent copies, replay rebuilds
the state exactly, and sharing is decided by chunk keys, from the plans."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from memflow.config import PRESETS
from memflow.memory import InProcessRanker
from memflow.pipeline import MemFlowGenerator
from memflow.script import parse_script
from memflow.story import Story
from memflow.tree import TreeRender, plan_runs, render_tree, videos_of
from memflow.video import read_frames

TREE = {"id": "trunk", "seed": 4, "segments": [{"prompt": "a lighthouse at dusk", "seconds": 1.5},
                                                {"prompt": "a storm gathers", "seconds": 1}],
        "branches": [
            {"id": "storm", "segments": [{"prompt": "lightning strikes the tower", "seconds": 1.5}],
             "branches": [{"id": "wreck", "segments": [{"prompt": "a ship runs aground", "seconds": 1}]},
                          {"id": "rescue", "segments": [{"prompt": "boats come out", "seconds": 1, "seed": 9}]}]},
            {"id": "calm", "video": False, "segments": [{"prompt": "the storm passes", "seconds": 0.75}],
             "branches": [{"id": "dawn", "segments": [{"prompt": "dawn over a calm sea", "seconds": 1.25}]}]},
            # opens with the same segment as "storm": the two share it (decided from the plans)
            {"id": "storm-long", "segments": [{"prompt": "lightning strikes the tower", "seconds": 3}]}]}


@pytest.fixture(scope="module")
def tiny():
    return MemFlowGenerator.from_preset("tiny", device="cpu")


def flat(tree: dict, video_id: str):
    return next(n.script for n in parse_script(tree).nodes() if n.video_id == video_id)


@pytest.mark.parametrize("fidelity", ["reference", "paper"])
@pytest.mark.parametrize("mode", ["off", "nam", "nam+sma"])
def test_every_node_equals_its_flattened_script_rendered_alone(mode, fidelity):
    preset = PRESETS["tiny"].with_memory(mode=mode, fidelity=fidelity, bank_size=2, record_interval=2)
    gen = MemFlowGenerator.from_preset(preset, device="cpu")
    script = parse_script(TREE)
    results = {}
    computed = TreeRender(gen, videos_of(gen, script), open_video=lambda v: _Frames(),
                          on_video=lambda v, g: results.__setitem__(v.video_id, g),
                          ranker=InProcessRanker() if mode == "nam" else None).render()
    assert sorted(results) == ["dawn", "rescue", "storm", "storm-long", "trunk", "wreck"], "calm has no video"
    for vid, g in results.items():
        alone = gen.generate(flat(TREE, vid), frames_to=list)
        assert torch.equal(g.latents, alone.latents), vid
        assert g.trace == alone.trace and g.sma_trace == alone.sma_trace, vid
        assert g.retrieval == alone.retrieval, vid  # the ranker's entries forked with the branch
        assert len(g.decoded) == len(alone.decoded) and all(np.array_equal(a, b) for a, b in
                                                            zip(g.decoded, alone.decoded)), vid
        story = g.story
        assert story["shared"] + story["generated"] + story["replayed"] == story["chunks"] == alone.plan.num_chunks
    # every chunk of the tree computed once: the longest path of each branch point, not each video
    assert computed == {"generated": len({k for v in videos_of(gen, script) for k in v.keys}), "replayed": 0}
    assert sum(g.plan.num_chunks for g in results.values()) > 2 * computed["generated"]


class _Frames:
    """A sink that keeps the frames (the tree's videos compared frame by frame)."""

    def __init__(self):
        self.frames = []

    def write(self, frame):
        self.frames.append(frame.copy())

    def close(self):
        return self.frames


def test_forks_are_decided_from_the_plans_and_memory_is_bounded_by_depth(tiny, monkeypatch):
    script = parse_script(TREE)
    root = plan_runs(videos_of(tiny, script))
    # trunk (3 chunks), then storm's segment is shared by storm and storm-long past the segment boundary
    shared = next(r for r in root.children if {v.video_id for v in r.videos} == {"storm", "wreck", "rescue",
                                                                                 "storm-long"})
    assert (shared.start, shared.end) == (root.end, root.end + 2)
    held, alive = [], []
    fork = Story.fork

    def counting(self, stream_id):
        alive.append(stream_id)
        held.append(len(render._open) + 1)
        return fork(self, stream_id)

    monkeypatch.setattr(Story, "fork", counting)
    render = TreeRender(tiny, videos_of(tiny, script), open_video=lambda v: _Frames(), on_video=lambda v, g: None)
    render.render()
    depth = max(n.depth for n in script.nodes())
    assert len(alive) == 3, "a fork per branch point child but the last: root (2), storm (1)"
    assert max(held) <= depth + 1, "never more stories than the tree is deep"
    assert not render._open, "every fork's memory released"


def test_tree_videos_are_the_flat_renders_frame_for_frame(tiny, tmp_path):
    small = {"id": "t", "seed": 2, "segments": [{"prompt": "a fox", "seconds": 1.5}],
             "branches": [{"id": "a", "segments": [{"prompt": "the fox sleeps", "seconds": 1}]},
                          {"id": "b", "segments": [{"prompt": "the fox runs", "seconds": 1}]}]}
    render_tree(tiny, parse_script(small), tmp_path / "tree", crf=0)
    for vid in ("t", "a", "b"):
        tiny.render(flat(small, vid), tmp_path / f"{vid}.mp4", crf=0)
        ours, alone = list(read_frames(tmp_path / "tree" / f"{vid}.mp4")), list(read_frames(tmp_path / f"{vid}.mp4"))
        assert len(ours) == len(alone) and all(np.array_equal(a, b) for a, b in zip(ours, alone)), vid


def test_a_fork_is_an_independent_copy(tiny):
    script = flat(TREE, "storm-long")
    story = tiny.story(script)
    for _ in range(4):
        story.step()
    copy = story.fork("copy")
    a = [story.step()[1] for _ in range(2)]
    b = [copy.step()[1] for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "same state, same chunks"
    assert story.memory.cache.k.data_ptr() != copy.memory.cache.k.data_ptr()
    again = tiny.generate(script)
    assert torch.equal(torch.cat(a, 2), again.latents[:, :, 12:18]), "the original was not disturbed"


def test_replay_rebuilds_the_state_with_the_cache_writing_passes_only(tiny, monkeypatch):
    """A prefix of known latents is replayed (a clean pass per chunk, plus the re-cache at a
    switch) and the rest generated: the same latents as generating everything."""
    script = flat(TREE, "rescue")  # a switch, a segment seed, 4 segments
    full = tiny.generate(script)
    passes = []
    original = tiny._pass

    def spy(mem, x, timestep, start, text, write, record=False):
        passes.append((start, write))
        return original(mem, x, timestep, start, text, write, record)

    monkeypatch.setattr(tiny, "_pass", spy)
    n = 5  # chunks known
    resumed = tiny.generate(script, prefix=full.latents[:, :, :n * 3])
    assert torch.equal(resumed.latents, full.latents)
    assert resumed.trace == full.trace and resumed.story == {"chunks": 7, "replayed": n, "generated": 2}
    replay = passes[:next(i for i, (_, write) in enumerate(passes) if not write)]  # up to the first denoising
    switches = [c for c in script.plan().switch_chunks if c <= n]  # chunk n's re-cache comes before it denoises
    assert len(replay) == n + len(switches), "one clean pass per chunk replayed, one re-cache per switch"
    later = [c for c in script.plan().switch_chunks if c > n]
    assert len(passes) == len(replay) + 5 * 2 + len(later), "then 5 passes a chunk generated (and its re-cache)"
    with pytest.raises(ValueError, match="not whole chunks"):
        tiny.generate(script, prefix=full.latents[:, :, :4])


def test_segment_seeds_restart_the_noise_and_keys_say_what_is_shared(tiny):
    base = {"seed": 1, "segments": [{"prompt": "a fox", "seconds": 1.5}, {"prompt": "snow", "seconds": 1.5}]}
    seeded = json.loads(json.dumps(base))
    seeded["segments"][1]["seed"] = 5
    other = json.loads(json.dumps(seeded))
    other["segments"][1]["seed"] = 6
    a, b, c = (parse_script(s) for s in (base, seeded, other))
    ka, kb, kc = (tiny.chunk_keys(s) for s in (a, b, c))
    switch = a.plan().switch_chunks[0]
    assert ka[:switch] == kb[:switch] == kc[:switch] and ka[switch] != kb[switch] != kc[switch]
    la, lb, lc = (tiny.generate(s).latents for s in (a, b, c))
    cut = switch * 3
    assert torch.equal(la[:, :, :cut], lb[:, :, :cut]) and not torch.equal(lb[:, :, cut:], lc[:, :, cut:])
    assert not torch.equal(la[:, :, cut:], lb[:, :, cut:])
    # a segment seed is a pure function of (script seed, segment seed): the same wherever it lands
    moved = parse_script({"seed": 1, "segments": [{"prompt": "a fox", "seconds": 1.5},
                                                  {"prompt": "snow", "seconds": 1.5, "seed": 5}]})
    assert torch.equal(tiny.generate(moved).latents, lb)
    # what else goes into a key: the root's seed, resolution, fps, and the engine
    for change in ({"seed": 2}, {"resolution": [48, 64]}, {"fps": 8}):
        assert tiny.chunk_keys(parse_script({**base, **change}))[0] != ka[0], change
    off = MemFlowGenerator.from_preset(PRESETS["tiny"].with_memory(mode="off"), device="cpu")
    assert off.chunk_keys(a)[0] != ka[0]


def test_the_cli_writes_one_mp4_per_node_into_a_folder(tmp_path):
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps(TREE))
    out = tmp_path / "videos"
    run = subprocess.run([sys.executable, "-m", "memflow", "render", "--script", str(tree), "-o", str(out),
                          "--device", "cpu", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{v}.mp4" for v in ("trunk", "storm", "wreck", "rescue",
                                                                               "dawn", "storm-long"))
    assert "6 videos" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "memflow", "render", "--script", str(tree), "-o",
                          str(tmp_path / "x.mp4")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "give --output a folder" in bad.stderr


def test_a_spool_gives_back_its_frames_and_leaves_nothing(tmp_path):
    from memflow.video import FrameSpool

    frames = [np.full((16, 24, 3), i * 10, dtype=np.uint8) for i in range(5)]
    spool = FrameSpool(tmp_path)
    for f in frames:
        spool.write(f)
    assert spool.count == 5 and all(np.array_equal(a, b) for a, b in zip(spool.frames(), frames))
    spool.delete()
    assert not list(tmp_path.iterdir())
