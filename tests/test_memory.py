"""NAM and SMA against brute force; bank invariants; determinism; bounded memory."""
import math

import pytest
import torch

from memflow.config import PRESETS
from memflow.memory import InProcessRanker, StreamMemory, frame_means, nam_scores, select_best, sma_select
from memflow.memory.sma import gather_frames
from memflow.pipeline import MemFlowGenerator
from memflow.script import parse_script
from memflow.transformer import build_transformer

from .test_streaming_equivalence import SeededText


def _generator(**memory):
    preset = PRESETS["tiny"].with_memory(**memory) if memory else PRESETS["tiny"]
    model = build_transformer(preset.transformer, seed=7)
    return MemFlowGenerator(model, SeededText(preset.transformer["text_dim"]), None, preset, device="cpu")


SCRIPT = {"segments": [{"prompt": f"scene {i}", "seconds": 1.5} for i in range(6)], "seed": 1}


def test_nam_score_is_the_brute_force_mean():
    g = torch.Generator().manual_seed(0)
    heads, d, text_len, tokens, n = 3, 8, 40, 12, 5
    q_text = torch.randn(heads, text_len, d, generator=g)
    keys = torch.randn(n, heads, tokens, d, generator=g)
    brute = torch.stack([torch.einsum("hjd,hnd->", q_text, k) / (heads * text_len * tokens) / math.sqrt(d)
                         for k in keys])
    descriptors = torch.stack([frame_means(k[None], tokens)[0, :, 0] for k in keys])
    torch.testing.assert_close(nam_scores(q_text.mean(1), descriptors), brute, atol=1e-5, rtol=1e-5)
    ids = [3, 9, 18, 27, 36]
    expected = [ids[i] for i in brute.topk(2).indices.tolist()]  # best first
    ranker = InProcessRanker()
    for f, desc in zip(ids, descriptors):
        ranker.record("v", f, desc[None].expand(2, -1, -1))
    assert ranker.rank("v", q_text.mean(1)[None].expand(2, -1, -1), [ids, ids[::-1]], 2) == [expected, expected]


def test_select_best_is_best_first_and_ties_keep_earlier():
    assert select_best([5, 1, 7], torch.tensor([1.0, 2.0, 1.0]), 2) == [1, 5]
    assert select_best([5, 1, 7], torch.tensor([1.0, 1.0, 1.0]), 2) == [5, 1]
    assert select_best([27, 27, 36], torch.tensor([0.5, 0.5, 0.1]), 2) == [27, 27], "copies are candidates too"


@pytest.mark.parametrize("fidelity", ["reference", "paper"])
def test_nam_keeps_the_best_frames_of_the_live_model(fidelity, monkeypatch):
    """Every NAM update in a real generation keeps, per block, the frames whose full
    (un-averaged) text-key x frame-key score is best, then the newest prototype. The
    reference ranks the current bank against the chunk's prompt at every chunk once
    more prototypes than slots were recorded (all-zero query at a switch: the earliest
    slots); paper ranks once per prototype, against the new prompt at a switch."""
    gen = _generator(mode="nam", bank_size=3, record_interval=1, fidelity=fidelity)
    texts = []
    real_text_context = gen.transformer.text_context
    monkeypatch.setattr(gen.transformer, "text_context", lambda e: texts.append(real_text_context(e)) or texts[-1])
    checks = []
    real_update = StreamMemory.update_bank

    def bank_keys(mem):  # per block, the keys [B, H, T, D] of each filled bank slot
        if not mem.bank.fill:
            return [[] for _ in range(mem.cache.num_blocks)]
        slots = mem.cache.frames_view(mem.cache.k)[:, :, :, mem.bank.first_slot:mem.bank.first_slot + mem.bank.fill]
        return [[slots[l, :, :, i].clone() for i in range(mem.bank.fill)] for l in range(mem.cache.num_blocks)]

    def update(self, descriptor, chunk, switch=False):
        before = ([list(f) for f in self.bank.frames], bank_keys(self), self.newest,
                  self.newest_admitted, self.recorded)
        real_update(self, descriptor, chunk, switch)
        checks.append((before, [list(f) for f in self.bank.frames], texts[-1], switch))

    monkeypatch.setattr(StreamMemory, "update_bank", update)
    generation = gen.generate(parse_script(SCRIPT))
    ranked = 0
    for (frames, keys, newest, admitted, recorded), after, text, switch in checks:
        if newest is None or (fidelity == "paper" and admitted):
            assert after == frames, "nothing new: the bank stays"
            continue
        for l, (ids, ks) in enumerate(zip(frames, keys)):
            assert after[l][-1] == newest.frame, "the newest prototype always enters last"
            assert len(after[l]) <= 3
            overflowed = recorded > 3 if fidelity == "reference" else len(ids) == 3
            if not overflowed:
                assert after[l] == (ids if admitted else ids + [newest.frame])
                continue
            if fidelity == "reference" and switch:
                assert after[l][:-1] == ids[:2], "all scores tie at a switch: the earliest slots stay"
                continue
            ranked += 1
            q = text.k[l][0]  # [H, S, D]
            brute = torch.stack([torch.einsum("hjd,hnd->", q, k[0]) / (q.shape[0] * q.shape[1] * k.shape[2])
                                 for k in ks]) / math.sqrt(q.shape[-1])
            best = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-float(brute[i]), i))[:2]]
            assert after[l][:-1] == (best if fidelity == "reference" else sorted(best, key=ids.index))
    assert ranked >= 8
    assert generation.trace and all(len(f) <= 3 for t in generation.trace for f in t["frames"])


def test_bank_selection_differs_between_blocks():
    gen = _generator(mode="nam", bank_size=2, record_interval=1)
    generation = gen.generate(parse_script(SCRIPT))
    assert any(len({tuple(f) for f in t["frames"]}) > 1 for t in generation.trace), \
        "selection is per block; with random weights some blocks must disagree"


def test_sma_keeps_exactly_the_top_k_per_head():
    g = torch.Generator().manual_seed(4)
    b, h, m, d, k, tokens = 1, 4, 6, 8, 3, 5
    q_mean = torch.randn(b, h, d, generator=g)
    means = torch.randn(b, h, m, d, generator=g)
    idx = sma_select(q_mean, means, k)
    for head in range(h):
        rel = [float(q_mean[0, head] @ means[0, head, c]) for c in range(m)]
        best = sorted(sorted(range(m), key=lambda c: -rel[c])[:k])
        assert idx[0, head].tolist() == best
    keys = torch.randn(b, h, m * tokens, d, generator=g)
    picked = gather_frames(keys, idx, tokens)
    for head in range(h):
        expected = torch.cat([keys[0, head, c * tokens:(c + 1) * tokens] for c in idx[0, head].tolist()])
        torch.testing.assert_close(picked[0, head], expected)
    assert picked.shape == (b, h, k * tokens, d)


def test_sma_trace_counts_what_sma_attended_on_writing_passes():
    gen = _generator(mode="nam+sma")
    mem = StreamMemory(gen.memory, len(gen.transformer.blocks), 16, InProcessRanker(), "v")
    mem.debug = []
    gen.generate(parse_script(SCRIPT), memory=mem)
    expected: dict[int, tuple] = {}  # pass -> (its start frame, memory frame -> (block, head) picks)
    for d in mem.debug:
        if d["write"] and d["sma"] is not None:
            frames = list(range(d["sink_frames"])) + d["bank"]
            counts = expected.setdefault(d["index"], (d["start"], {}))[1]
            for i in d["sma"].flatten().tolist():
                counts[frames[i]] = counts.get(frames[i], 0) + 1
    assert len(expected) > 3
    assert [(t["start"], dict(t["frames"])) for t in mem.sma_trace] == list(expected.values())
    heads, top_k = gen.transformer.config.num_attention_heads, gen.memory.sma_top_k
    for t in mem.sma_trace:  # every (block, head) pair picks exactly top_k frames
        assert sum(n for _, n in t["frames"]) == len(gen.transformer.blocks) * heads * top_k
    assert _generator(mode="nam").generate(parse_script(SCRIPT)).sma_trace == []


def test_determinism_by_seed():
    gen = _generator(mode="nam+sma")
    a = gen.generate(parse_script(SCRIPT))
    b = gen.generate(parse_script(SCRIPT))
    c = gen.generate(parse_script({**SCRIPT, "seed": 2}))
    assert torch.equal(a.latents, b.latents)
    assert a.trace == b.trace and a.sma_trace == b.sma_trace
    assert not torch.allclose(a.latents, c.latents)


def test_memory_does_not_grow_with_length():
    gen = _generator(mode="nam+sma")
    short = gen.generate(parse_script({"segments": [{"prompt": "a", "seconds": 4}, {"prompt": "b", "seconds": 4}]}))
    long = gen.generate(parse_script({"segments": [{"prompt": "a", "seconds": 16}, {"prompt": "b", "seconds": 16}]}))
    assert long.plan.num_chunks >= 4 * short.plan.num_chunks - 1
    assert long.peak_memory_bytes == short.peak_memory_bytes > 0
    cfg = gen.memory
    tokens = 16
    kv_frame = 2 * len(gen.transformer.blocks) * 2 * tokens * 24 * 4  # k+v, blocks, heads, tokens, head_dim, fp32
    # the preallocated cache: sink, bank, window and one chunk's slots; the prototype; mean keys (fp32)
    frames = cfg.sink_size + cfg.bank_size + cfg.window_past_frames + cfg.frames_per_chunk
    means = len(gen.transformer.blocks) * 2 * (cfg.sink_size + cfg.bank_size + 1) * 24 * 4
    assert long.peak_memory_bytes == (frames + 1) * kv_frame + means


def test_memory_modes_change_the_video():
    script = parse_script(SCRIPT)
    off = _generator(mode="off").generate(script).latents
    nam = _generator(mode="nam").generate(script).latents
    sma = _generator(mode="nam+sma").generate(script).latents
    first = 3 * 4  # chunks before the sink leaves the window are identical without a bank
    assert torch.equal(off[:, :, :3], nam[:, :, :3])
    assert not torch.allclose(off[:, :, first:], nam[:, :, first:])
    assert not torch.allclose(nam[:, :, first:], sma[:, :, first:])
