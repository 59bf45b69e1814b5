"""The two memory policies, item by item (memflow-algorithm.md, section 7).

`reference` reproduces what the released checkpoint was trained with; `paper` keeps
the paper's clean semantics. Each test names the item of section 7 it pins down. The
frames a pass attends come from the memory's debug log, whose truth is checked
against a dense recompute in test_streaming_equivalence.py; here the key tensors'
lengths are checked against it too.
"""
import math

import pytest
import torch

from memflow.config import PRESETS, MemoryConfig
from memflow.memory import InProcessRanker, StreamMemory, select_best
from memflow.pipeline import MemFlowGenerator
from memflow.script import parse_script
from memflow.transformer import build_transformer

from .test_streaming_equivalence import SeededText

T = 16  # tokens per latent frame of the tiny preset at 64x64


def _run(fidelity, mode="nam", segments=(("a fox", 16),), ranker=None, spy_keys=False, **memory):
    """Generate a script at 16 fps (4 latent frames a second); returns (memory, generation, keys log)."""
    preset = PRESETS["tiny"].with_memory(mode=mode, fidelity=fidelity, **memory)
    model = build_transformer(preset.transformer, seed=7)
    gen = MemFlowGenerator(model, SeededText(preset.transformer["text_dim"]), None, preset, device="cpu")
    script = parse_script({"segments": [{"prompt": p, "seconds": s} for p, s in segments], "seed": 1})
    mem = StreamMemory(preset.memory, len(model.blocks), T, ranker or InProcessRanker(), "v")
    mem.debug = []
    keys = []
    if spy_keys:  # the number of key frames each pass's queries attend (unmasked), per block
        real = mem.keys

        def spy(block, q, k, v):
            out = real(block, q, k, v)
            attended = out[0].shape[2] if out[2] is None else int(out[2].sum())
            keys.append((mem._pass["index"], block, attended // T))
            return out

        mem.keys = spy
    generation = gen.generate(script, memory=mem)
    return mem, generation, keys


def _passes(mem, block=0):
    """Per pass (block 0): its debug entry, with `memory` = the frame ids of [sink | bank]."""
    out = []
    for d in mem.debug:
        if d["block"] == block:
            out.append({**d, "memory": list(range(d["sink_frames"])) + d["bank"]})
    return out


def _chunk_pass(mem, chunk):
    """The first denoising pass of a chunk (block 0)."""
    return next(p for p in _passes(mem) if p["start"] == 3 * chunk and not p["write"])


def _recache_passes(entries):
    """The writing passes that rewrite frames already written (a switch's re-cache)."""
    end, out = 0, []
    for p in entries:
        if p["write"]:
            if p["start"] < end:
                out.append(p)
            end = max(end, p["start"] + p["frames"])
    return out


# -- item 1: the attention budget counts the sink ---------------------------------------
@pytest.mark.parametrize("fidelity", ["reference", "paper"])
def test_budget_is_3_sink_6_past_3_own(fidelity):
    mem, _, keys = _run(fidelity, spy_keys=True)
    counts = {(i, b): n for i, b, n in keys}
    expected = {  # chunk -> (memory frames, local frames) of its first denoising pass
        "reference": {1: ([0, 1, 2, 0], [3, 4, 5]),
                      4: ([0, 1, 2, 0, 9], [6, 7, 8, 9, 10, 11, 12, 13, 14]),
                      20: ([0, 1, 2], list(range(54, 63)))},
        "paper": {1: ([0], [0, 1, 2, 3, 4, 5]),
                  4: ([0, 1, 2, 0, 9], [6, 7, 8, 9, 10, 11, 12, 13, 14]),
                  20: ([0, 1, 2], list(range(54, 63)))},
    }[fidelity]
    for chunk, (memory, local) in expected.items():
        p = _chunk_pass(mem, chunk)
        if chunk == 20:  # the sink, then a full bank (which frames: NAM's choice)
            memory = memory + p["bank"]
            assert len(p["bank"]) == 3
        assert (p["memory"], p["local"]) == (memory, local), (fidelity, chunk)
        assert counts[(p["index"], 0)] == len(memory) + len(local), "the keys attended are exactly these frames"
    # in steady state: 3 sink + 3 bank + 6 past + 3 own = 15 frames, not 18
    assert counts[(_chunk_pass(mem, 20)["index"], 0)] == 15


def test_local_attn_size_must_hold_sink_and_chunk():
    with pytest.raises(ValueError, match="counts the sink"):
        MemoryConfig(local_attn_size=3)
    assert MemoryConfig().window_past_frames == 6


# -- item 2: SMA chooses among [sink | bank] from chunk 1 on ---------------------------------
def test_sma_candidates_in_chunk_1():
    ref, _, _ = _run("reference", mode="nam+sma", segments=(("a fox", 3),))
    p = _chunk_pass(ref, 1)
    assert p["memory"] == [0, 1, 2, 0], "reference: the sink frames are SMA candidates in chunk 1"
    heads = p["sma"].shape[1]
    assert p["sma"].shape == (1, heads, 3) and int(p["sma"].max()) <= 3
    assert p["local"] == [3, 4, 5]
    paper, _, _ = _run("paper", mode="nam+sma", segments=(("a fox", 3),))
    p = _chunk_pass(paper, 1)
    assert p["memory"] == [0] and p["sma"] is None, "paper: the recent sink is window, never filtered"
    assert p["local"] == [0, 1, 2, 3, 4, 5]


# -- item 3: the re-cache at a prompt switch --------------------------------------------------
def _sink_keys(mem):
    """Per block, the keys the sink slots hold."""
    c = mem.cache
    return [None if not c.allocated else c.k[l][:, :, :c.sink_slots * T].clone() for l in range(c.num_blocks)]


def _window_keys(mem):
    """Per block, the keys of the frames the window holds, in frame order."""
    c, w = mem.cache, mem.window
    return [torch.cat([c.k[l][:, :, w.slot(f) * T:(w.slot(f) + 1) * T] for f in range(w.start, w.end)], 2)
            for l in range(c.num_blocks)]


def _spy_writes(mem):
    """Record, per writing pass, its own keys per block and the sink before it."""
    log = []
    real_keys, real_begin = mem.keys, mem.begin_pass

    def begin(frame_start, frames, write, record=False):
        if write:
            log.append({"start": frame_start, "frames": frames, "k": {}, "sink_before": _sink_keys(mem)})
        return real_begin(frame_start, frames, write, record)

    def keys(block, q, k, v):
        if mem._pass["write"]:
            log[-1]["k"][block] = k.clone()
        return real_keys(block, q, k, v)

    mem.begin_pass, mem.keys = begin, keys
    return log


@pytest.mark.parametrize("switch_frame", [9, 42])
@pytest.mark.parametrize("fidelity", ["reference", "paper"])
def test_recache_frames_and_slots(fidelity, switch_frame):
    preset = PRESETS["tiny"].with_memory(mode="nam", fidelity=fidelity)
    model = build_transformer(preset.transformer, seed=7)
    gen = MemFlowGenerator(model, SeededText(preset.transformer["text_dim"]), None, preset, device="cpu")
    script = parse_script({"segments": [{"prompt": "a fox", "seconds": switch_frame / 4},
                                        {"prompt": "the fox sleeps", "seconds": 1.5}], "seed": 1})
    mem = StreamMemory(preset.memory, len(model.blocks), T, InProcessRanker(), "v")
    writes = _spy_writes(mem)
    states = {}
    real_recache = gen._recache

    def recache(mem_, latents, text):
        real_recache(mem_, latents, text)
        states["window"] = (mem_.window.start, mem_.window.end, _window_keys(mem_))
        states["sink"] = _sink_keys(mem_)

    gen._recache = recache
    gen.generate(script, memory=mem)
    recache = _recache_passes({**w, "write": True} for w in writes)
    s = switch_frame
    if fidelity == "reference":
        assert [(w["start"], w["frames"]) for w in recache] == [(max(0, s - 12), min(12, s))]
    else:
        assert [(w["start"], w["frames"]) for w in recache] == [(s - 6, 3), (s - 3, 3)]
    first, end, window_k = states["window"]
    assert (first, end) == (s - 6, s), "the window holds the 6 frames before the switch"
    for block in range(len(window_k)):  # ... and exactly the re-cached keys of those frames
        recomputed = torch.cat([w["k"][block] for w in recache], 2)
        torch.testing.assert_close(window_k[block], recomputed[:, :, -6 * T:], atol=0, rtol=0)
    sink_overwritten = fidelity == "reference" and s <= 12
    for block, before in enumerate(recache[0]["sink_before"]):
        after = states["sink"][block]
        if sink_overwritten:  # the pass starts at frame 0 and writes the sink with new-prompt KV
            assert not torch.equal(after, before)
            torch.testing.assert_close(after, recache[0]["k"][block][:, :, :3 * T], atol=0, rtol=0)
        else:
            assert torch.equal(after, before), "the sink is never overwritten here"


# -- items 4 and 5: bank updates, copies, the switch's all-zero query ------------------------
class PlantedRanker(InProcessRanker):
    """Ranks by a planted score per block (block 0: the newest frame best, block 1: the
    oldest), ignoring the descriptors; remembers the text of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def rank(self, video, text, candidates, keep):
        self.calls.append(text.clone())
        planted = [lambda f: f, lambda f: -f]
        return [select_best(ids, torch.tensor([float(planted[l](f)) for f in ids]), keep)
                for l, ids in enumerate(candidates)]


def _banks(mem, chunks):
    """Bank frames per block (0 and 1) as each chunk's denoising passes see them."""
    out = {}
    for p in _passes(mem, 0) + _passes(mem, 1):
        if not p["write"]:
            out.setdefault(p["start"] // 3, {})[p["block"]] = p["bank"]
    return [[out[c][0], out[c][1]] for c in range(chunks)]


def test_bank_through_30_chunks_reference_keeps_copies():
    mem, _, _ = _run("reference", segments=(("a fox", 22.5),), ranker=PlantedRanker())
    banks = _banks(mem, 30)
    newest = [[], [0], [0], [0], [0, 9], [0, 9], [0, 9], [0, 9, 18], [0, 9, 18], [0, 9, 18],
              [18, 9, 27], [27, 18, 27], [27, 27, 27], [27, 27, 36], [36, 27, 36], [36, 36, 36],
              [36, 36, 45], [45, 36, 45], [45, 45, 45]]
    oldest = [[], [0], [0], [0], [0, 9], [0, 9], [0, 9], [0, 9, 18], [0, 9, 18], [0, 9, 18],
              [0, 9, 27], [0, 9, 27], [0, 9, 27], [0, 9, 36]]
    assert [b[0] for b in banks[:len(newest)]] == newest
    assert [b[1] for b in banks[:len(oldest)]] == oldest
    for c in range(10, 30):  # every chunk once overflowed: newest re-admitted at the end
        assert banks[c][0][-1] == banks[c][1][-1] == 9 * ((c - 1) // 3)
    assert banks[29][0] == [81, 72, 81] and banks[29][1] == [0, 9, 81]
    assert len(mem.ranker.calls) == 30 - 10, "one ranking per chunk once the bank overflowed"


def test_bank_through_30_chunks_paper_admits_each_once():
    mem, _, _ = _run("paper", segments=(("a fox", 22.5),), ranker=PlantedRanker())
    banks = _banks(mem, 30)
    assert [b[0] for b in banks[:17]] == [
        [], [0], [0], [0], [0, 9], [0, 9], [0, 9], [0, 9, 18], [0, 9, 18], [0, 9, 18],
        [9, 18, 27], [9, 18, 27], [9, 18, 27], [18, 27, 36], [18, 27, 36], [18, 27, 36], [27, 36, 45]]
    assert banks[29][0] == [63, 72, 81] and banks[29][1] == [0, 9, 81]
    assert all(len(set(b)) == len(b) for chunk in banks for b in chunk), "no copies"
    assert len(mem.ranker.calls) == 7, "one ranking per prototype once the bank is full"


def test_switch_scores_all_zero_under_reference():
    """Section 7, item 5: at a switch the two bank updates see an all-zero text query, so
    every score ties and the earliest slots stay; paper ranks against the new prompt."""
    segments = (("a fox", 9.75), ("the fox sleeps", 3))  # switch at frame 39 -> chunk 13
    ref, _, _ = _run("reference", segments=segments, ranker=PlantedRanker())
    banks = _banks(ref, 16)
    assert banks[12][0] == [27, 27, 27] and banks[12][1] == [0, 9, 27]
    # re-cache update and chunk 13's update: keep slots 0 and 1, append the newest (36)
    assert banks[13][0] == [27, 27, 36] and banks[13][1] == [0, 9, 36]
    assert len([t for t in ref.trace if t["chunk"] == 13]) == 2, "the re-cache's update, then the chunk's"
    assert len(ref.ranker.calls) == len([10, 11, 12, 14, 15, 16]), "the switch's updates do not rank: all tie"
    # The tie rule on real descriptors: with an all-zero query every NAM score is 0.
    assert select_best([27, 27, 36], torch.zeros(3), 2) == [27, 27]
    assert select_best([5, 1, 7], torch.zeros(3), 2) == [5, 1]

    paper, _, _ = _run("paper", segments=segments, ranker=PlantedRanker())
    assert _banks(paper, 16)[13][0] == [18, 27, 36]
    new_prompt = paper.ranker.calls[-1]
    assert new_prompt.abs().sum() > 0, "paper ranks against the new prompt"


# -- item 6: the re-cache pass sees the updated bank ------------------------------------------
@pytest.mark.parametrize("fidelity", ["reference", "paper"])
def test_recache_sees_the_bank_after_its_update(fidelity):
    # switch at frame 12 (chunk 4); prototype 9 was recorded in chunk 3's clean pass
    mem, _, _ = _run(fidelity, segments=(("a fox", 3), ("the fox sleeps", 3)))
    recache_banks = [p["bank"] for p in _recache_passes(_passes(mem))]
    expected = [[0, 9]] if fidelity == "reference" else [[0], [0]]
    assert recache_banks == expected
    assert _chunk_pass(mem, 4)["bank"] == [0, 9]


# -- both policies: determinism and bounded memory ---------------------------------------------
@pytest.mark.parametrize("fidelity", ["reference", "paper"])
def test_policies_are_deterministic_and_bounded(fidelity):
    segs = (("a", 4), ("b", 4), ("c", 4))
    _, a, _ = _run(fidelity, mode="nam+sma", segments=segs)
    _, b, _ = _run(fidelity, mode="nam+sma", segments=segs)
    assert torch.equal(a.latents, b.latents) and a.trace == b.trace and a.sma_trace == b.sma_trace
    _, long, _ = _run(fidelity, mode="nam+sma", segments=(("a", 16), ("b", 16), ("c", 16)))
    assert long.peak_memory_bytes == a.peak_memory_bytes
    kv_frame = 2 * 2 * 2 * T * 24 * 4  # k+v, blocks, heads, tokens, head_dim, fp32
    cfg = MemoryConfig()
    frames = cfg.sink_size + cfg.bank_size + cfg.window_past_frames + cfg.frames_per_chunk + 1  # + prototype
    assert long.peak_memory_bytes <= frames * kv_frame + 2 * 2 * 7 * 24 * 4  # + mean keys


def test_policies_differ_and_name_themselves():
    segs = (("a", 4), ("b", 4))
    _, ref, _ = _run("reference", segments=segs)
    _, paper, _ = _run("paper", segments=segs)
    assert not torch.allclose(ref.latents, paper.latents)
    preset = PRESETS["tiny"]
    fingerprints = {MemFlowGenerator(None, None, None, preset.with_memory(fidelity=f)).config_fingerprint
                    for f in ("reference", "paper")}
    assert len(fingerprints) == 2
    assert math.isfinite(float(ref.latents.abs().max()))
