"""Checkpoints of stories in flight (cluster/checkpoint.py): what an attempt saved is
replayed by the next one, exactly; a torn, corrupt or stale checkpoint is never used."""
from __future__ import annotations

import json

import pytest
import torch

from cluster.checkpoint import Checkpoints, state_dir
from cluster.storage import Storage
from memflow.pipeline import MemFlowGenerator
from memflow.script import parse_script
from memflow.tree import TreeRender, videos_of

SCRIPT = {"id": "long", "seed": 3, "segments": [{"prompt": "a lighthouse", "seconds": 2},
                                               {"prompt": "a storm", "seconds": 2}]}


@pytest.fixture(scope="module")
def tiny():
    return MemFlowGenerator.from_preset("tiny", device="cpu")


def render(gen, script, known=None, every_s=0.0, storage=None):
    """The story through TreeRender (as a replica renders it), checkpointing every `every_s`."""
    checkpoints = Checkpoints(storage, script.video_id, every_s) if storage is not None else None
    results = {}

    def on_chunk(event, key, x):
        if checkpoints is not None and not event.replayed:
            checkpoints.add(key, x)

    chunks = TreeRender(gen, videos_of(gen, script), open_video=lambda v: _Count(), known=(known or {}).get,
                        on_video=lambda v, g: results.__setitem__(v.video_id, g), on_chunk=on_chunk).render()
    if checkpoints is not None:
        checkpoints.wait()
    return results[script.video_id], chunks, checkpoints


class _Count:
    frames = 0

    def write(self, frame):
        self.frames += 1

    def close(self):
        return self.frames


def test_a_retry_replays_what_was_saved_and_generates_only_the_rest(tiny, tmp_path):
    storage = Storage(str(tmp_path / "out"))
    script = parse_script(SCRIPT)
    full, _, saver = render(tiny, script, every_s=1e-9, storage=storage)  # a part after every chunk
    assert saver.saved == full.plan.num_chunks and saver.error is None
    listing = json.loads(storage.read_text(f"{state_dir('long')}/checkpoint.json"))
    assert len(listing["parts"]) == full.plan.num_chunks
    # an attempt that died after saving 5 chunks: the list names only those
    storage.write_json(f"{state_dir('long')}/checkpoint.json", {"parts": listing["parts"][:5]})
    known = Checkpoints(storage, "long", 120).load()
    assert len(known) == 5 and {k.source for k in known.values()} == {"resumed"}
    resumed, chunks, _ = render(tiny, script, known)
    assert torch.equal(resumed.latents, full.latents) and resumed.trace == full.trace
    assert chunks == {"generated": full.plan.num_chunks - 5, "replayed": 5}
    assert resumed.story["prefix"] == "resumed" and resumed.story["resumed"] == 5
    Checkpoints(storage, "long", 120).delete()
    assert storage.list(state_dir("long")) == []


def test_torn_corrupt_and_stale_checkpoints_are_ignored(tiny, tmp_path):
    storage = Storage(str(tmp_path / "out"))
    script = parse_script(SCRIPT)
    render(tiny, script, every_s=1e-9, storage=storage)
    folder = state_dir("long")
    listing = json.loads(storage.read_text(f"{folder}/checkpoint.json"))
    # a part whose bytes changed after the list was written (torn by a dying writer): left out
    first = listing["parts"][0]["name"]
    storage.write_bytes(f"{folder}/{first}", storage.read_bytes(f"{folder}/{first}")[:-7])
    assert len(Checkpoints(storage, "long", 120).load()) == len(listing["parts"]) - 1
    # a list torn mid-write: nothing is used
    storage.write_text(f"{folder}/checkpoint.json", '{"parts": [{"name": ')
    assert Checkpoints(storage, "long", 120).load() == {}
    # parts no list names (the attempt died before writing the list): nothing is used
    storage.delete(f"{folder}/checkpoint.json")
    assert Checkpoints(storage, "long", 120).load() == {}
    # stale: the same id, other content: its keys are never asked for, every chunk is generated
    storage.write_json(f"{folder}/checkpoint.json", listing)
    other = parse_script({**SCRIPT, "seed": 4})
    known = Checkpoints(storage, "long", 120).load()
    result, chunks, _ = render(tiny, other, known)
    assert chunks["replayed"] == 0 and torch.equal(result.latents, tiny.generate(other).latents)
