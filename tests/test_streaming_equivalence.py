"""Streaming with caches == a full recompute under the same attention pattern."""
import pytest
import torch

from memflow.config import PRESETS
from memflow.memory import InProcessRanker, StreamMemory
from memflow.pipeline import MemFlowGenerator
from memflow.script import parse_script
from memflow.transformer import build_transformer

from .reference import Pass, reference_outputs


class SeededText:
    """Distinct, deterministic prompt embeddings without a text model."""

    def __init__(self, dim):
        self.dim = dim

    def encode(self, prompts):
        g = torch.Generator().manual_seed(sum(map(ord, prompts[0])))
        return torch.randn(1, 512, self.dim, generator=g)


def _record_passes(gen, monkeypatch):
    passes = []
    original = gen._pass

    def spy(mem, x, timestep, start, text, write, record=False):
        out = original(mem, x, timestep, start, text, write, record)
        passes.append(Pass(len(passes), start, x.clone(), float(timestep), write, text, out.clone()))
        return out

    monkeypatch.setattr(gen, "_pass", spy)
    return passes


@pytest.mark.parametrize("fidelity", ["reference", "paper"])
@pytest.mark.parametrize("mode", ["off", "nam", "nam+sma"])
def test_streaming_equals_full_recompute(mode, fidelity, monkeypatch):
    preset = PRESETS["tiny"].with_memory(mode=mode, fidelity=fidelity, bank_size=2, sma_top_k=2, record_interval=2)
    model = build_transformer(preset.transformer, seed=3)
    gen = MemFlowGenerator(model, SeededText(preset.transformer["text_dim"]), None, preset, device="cpu")
    # 10 chunks; a switch at frame 9 (the re-cache reaches the sink) and one at frame 21 (it does not)
    script = parse_script({"segments": [{"prompt": "a red fox runs", "seconds": 2.25},
                                        {"prompt": "the fox sleeps", "seconds": 3.0},
                                        {"prompt": "snow falls", "seconds": 2.25}], "seed": 5})
    plan = script.plan()
    assert plan.num_chunks == 10 and plan.switch_chunks == [3, 7]
    h, w = gen.latent_shape(script)
    mem = StreamMemory(preset.memory, len(model.blocks), (h // 2) * (w // 2), InProcessRanker(), "v")
    mem.debug = []
    passes = _record_passes(gen, monkeypatch)
    gen.generate(script, memory=mem)

    recache = [(p.start, p.x.shape[2]) for i, p in enumerate(passes) if p.write and p.start < max(
        [q.start + q.x.shape[2] for q in passes[:i] if q.write], default=0)]
    if fidelity == "reference":  # one pass over the last min(12, start) frames
        assert recache == [(0, 9), (9, 12)]
    else:  # the window's 6 frames, chunk by chunk
        assert recache == [(3, 3), (6, 3), (15, 3), (18, 3)]
    if mode != "off":
        assert any(d["bank"] for d in mem.debug), "the bank must be attended"
    if mode == "nam+sma":
        assert any(d["sma"] is not None for d in mem.debug), "SMA must drop frames"

    ref = reference_outputs(model, passes, mem.debug, preset.memory)
    assert len(ref) == len(passes) == 10 * 5 + len(recache)
    for p, r in zip(passes, ref):
        torch.testing.assert_close(p.out, r.float(), atol=2e-4, rtol=2e-4,
                                   msg=lambda m: f"pass {p.index} (start {p.start}, t={p.timestep}): {m}")


def test_first_chunk_equals_diffusers():
    from diffusers import WanTransformer3DModel

    dims = PRESETS["tiny"].transformer
    ours = build_transformer(dims, seed=11)
    theirs = WanTransformer3DModel(**dims).eval()
    theirs.load_state_dict(ours.state_dict())  # same names, same shapes: loads unchanged
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 12, generator=g)
    text = torch.randn(1, 512, dims["text_dim"], generator=g)
    for t in (1000.0, 625.0, 0.0):
        with torch.no_grad():
            expected = theirs(x, torch.tensor([t]), text).sample
        got = ours.forward_chunk(x, torch.full((1, 3), t), 0, ours.text_context(text))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reference_matches_diffusers_on_one_group():
    """The reference itself is right on the case diffusers can check."""
    from diffusers import WanTransformer3DModel

    preset = PRESETS["tiny"]
    ours = build_transformer(preset.transformer, seed=2)
    theirs = WanTransformer3DModel(**preset.transformer).eval()
    theirs.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    text = torch.randn(1, 512, preset.transformer["text_dim"], generator=g)
    alone = preset.with_memory(fidelity="paper").memory  # the first chunk attends itself, no memory part
    (out,) = reference_outputs(ours, [Pass(0, 0, x, 833.0, True, ours.text_context(text))], [], alone)
    with torch.no_grad():
        torch.testing.assert_close(out.float(), theirs(x, torch.tensor([833.0]), text).sample, atol=1e-5, rtol=1e-5)
