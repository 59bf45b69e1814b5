"""The GPU fast path, checked on the CPU: the chunk loop never reads the device back, the
blocks compile as whole graphs, attention kernels are chosen or refused clearly, and
frames are decoded while the next chunks are generated."""
import contextlib
import threading

import numpy as np
import pytest
import torch

from memflow.attention import AttentionBackend
from memflow.config import PRESETS
from memflow.memory import InProcessRanker
from memflow.pipeline import MemFlowGenerator
from memflow.script import parse_script
from memflow.transformer import Compiled, build_transformer
from memflow.vae import WanVAE

from .test_streaming_equivalence import SeededText

# Every way Python code reads tensor data back to the host: on a GPU each one waits
# for the device to finish all the work queued before it.
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique")


@contextlib.contextmanager
def no_device_reads():
    """Fail any read of tensor data back to the host inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def forbid(name):
        def read(*args, **kwargs):
            raise AssertionError(f"Tensor.{name}() read the device back inside the chunk loop")
        return read

    try:
        for name in READS:
            setattr(torch.Tensor, name, forbid(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _generator(**memory):
    preset = PRESETS["tiny"].with_memory(**memory)
    model = build_transformer(preset.transformer, seed=7)
    return MemFlowGenerator(model, SeededText(preset.transformer["text_dim"]), None, preset, device="cpu")


SCRIPT = {"segments": [{"prompt": "a fox", "seconds": 6}, {"prompt": "the fox sleeps", "seconds": 3},
                       {"prompt": "snow", "seconds": 6}], "seed": 3}


def test_guard_catches_reads():
    with no_device_reads(), pytest.raises(AssertionError, match="item"):
        torch.ones(2).sum().item()
    assert torch.ones(2).sum().item() == 2.0


@pytest.mark.parametrize("fidelity", ["reference", "paper"])
@pytest.mark.parametrize("mode", ["off", "nam", "nam+sma"])
def test_chunk_loop_never_reads_the_device(mode, fidelity):
    """Noise, RoPE, memory layout, NAM ranking (in process), bank updates, SMA and the
    traces all stay on the device for a whole video with two prompt switches; the
    traces are read once, after it."""
    gen = _generator(mode=mode, fidelity=fidelity, record_interval=1)
    script = parse_script(SCRIPT)
    mem = gen.memory_for(script)
    chunks = []
    with no_device_reads():
        for event, x0 in gen.chunks(script, mem):
            chunks.append(x0)
    assert len(chunks) == script.plan().num_chunks == 20
    if mode != "off":
        assert len(mem.trace) >= 19 and mem.close()["updates"], "the bank filled and NAM ranked"
    if mode == "nam+sma":
        assert mem.sma_trace, "SMA picked frames"
    # the same video as the generate() path, which reads the latents back once at the end
    assert torch.equal(torch.cat(chunks, 2), gen.generate(script).latents)


def test_service_ranking_is_the_one_round_trip():
    """A ranking service needs descriptors on the host: that path does read back (and
    is documented as the service's cost); it gives the same video."""
    gen = _generator(mode="nam")
    script = parse_script(SCRIPT)
    with no_device_reads(), pytest.raises(AssertionError):
        for _ in gen.chunks(script, gen.memory_for(script, ranker=InProcessRanker())):
            pass
    assert torch.equal(gen.generate(script, ranker=InProcessRanker()).latents, gen.generate(script).latents)


# -- compiled blocks ----------------------------------------------------------------------
def _compiled_equals_eager(backend):
    gen = _generator(mode="nam+sma")
    script = parse_script({"segments": [{"prompt": "a", "seconds": 4}, {"prompt": "b", "seconds": 3}], "seed": 2})
    eager = gen.generate(script)
    gen.transformer.execution = Compiled(backend=backend)  # fullgraph=True: a graph break is an error
    compiled = gen.generate(script)
    assert gen.transformer.compiled
    assert eager.trace == compiled.trace and eager.sma_trace == compiled.sma_trace
    return eager.latents, compiled.latents


def test_block_halves_compile_as_whole_graphs():
    """Dynamo traces both block halves with fullgraph=True through a video with a prompt
    switch (chunk passes, a re-cache span, masked and unmasked, SMA gathers): no graph
    break anywhere. aot_eager runs the traced graphs as they are: equal to eager."""
    eager, compiled = _compiled_equals_eager("aot_eager")
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_inductor_compiled_equals_eager():
    """The compiled kernels themselves (inductor, C++ on the CPU): equal within float tolerance."""
    eager, compiled = _compiled_equals_eager("inductor")
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


# -- attention backends ---------------------------------------------------------------------
def test_attention_backend_choice_and_clear_failure():
    cpu = torch.device("cpu")
    assert AttentionBackend("auto").check(cpu, torch.float32, 24).name == "auto"
    assert AttentionBackend("math").check(cpu, torch.float32, 24).name == "math"
    for name in ("cudnn", "efficient", "fa3"):  # kernels this machine lacks: refused at start-up, named
        with pytest.raises(ValueError, match=name):
            AttentionBackend(name).check(cpu, torch.float32, 24)
    with pytest.raises(ValueError, match="choose one of"):
        AttentionBackend("fastest")
    gen = _generator(mode="nam+sma")
    script = parse_script({"segments": [{"prompt": "a", "seconds": 3}], "seed": 1})
    default = gen.generate(script).latents
    gen.transformer.attention = AttentionBackend("math").check(cpu, torch.float32, 24)
    torch.testing.assert_close(gen.generate(script).latents, default, atol=1e-5, rtol=1e-5)


# -- decoding alongside generation -------------------------------------------------------------
def _decoding_generator():
    preset = PRESETS["tiny"]
    gen = _generator()
    gen.vae = WanVAE.from_config(preset.vae, seed=0)
    return gen


def test_frames_are_decoded_while_generating_and_bounded():
    gen = _decoding_generator()
    script = parse_script({"segments": [{"prompt": "a", "seconds": 6}], "seed": 4})
    generated, lead = [0], []

    def consume(frames):
        out = []
        for frame in frames:
            out.append(frame)
            lead.append(generated[0] - (1 + (len(out) - 1) // 4) // 3)  # chunks ahead of what is decoded
        return out

    result = gen.generate(script, frames_to=consume, on_chunk=lambda e: generated.__setitem__(0, e.chunk + 1))
    n = script.plan().num_chunks
    assert len(result.decoded) == script.plan().num_video_frames
    assert min(lead) < n - 1, "decoding started before generation ended"
    assert max(lead) <= 2 + 2, "at most `depth` chunks wait between generation and decoding"
    expected = list(gen.frames(result))  # the same frames as decoding after the fact
    assert all(np.array_equal(a, b) for a, b in zip(result.decoded, expected))


def test_a_failing_decoder_stops_generation_and_a_failing_generation_stops_the_decoder():
    gen = _decoding_generator()
    script = parse_script({"segments": [{"prompt": "a", "seconds": 12}], "seed": 4})
    seen = []

    def broken(frames):
        for i, _ in enumerate(frames):
            if i == 5:
                raise OSError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        gen.generate(script, frames_to=broken, on_chunk=lambda e: seen.append(e.chunk))
    assert len(seen) < script.plan().num_chunks - 2, "generation stopped soon after the decoder failed"

    threads = threading.active_count()

    def fail_at_3(event):
        if event.chunk == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gen.generate(script, frames_to=lambda frames: sum(1 for _ in frames), on_chunk=fail_at_3)
    assert threading.active_count() == threads, "the decoder thread ended"


def test_bf16_decode_matches_fp32():
    """The GPU decodes in bfloat16: pixels against float32 on the CPU (PSNR printed)."""
    vae32 = WanVAE.from_config(PRESETS["tiny"].vae, seed=0)
    vae16 = WanVAE.from_config(PRESETS["tiny"].vae, seed=0).to("cpu", torch.bfloat16)
    z = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    a = np.stack(list(vae32.decode_stream(z))).astype(np.float64)
    b = np.stack(list(vae16.decode_stream(z))).astype(np.float64)
    psnr = 10 * np.log10(255 ** 2 / ((a - b) ** 2).mean())
    print(f"bf16 vs fp32 decode: PSNR {psnr:.1f} dB")
    assert psnr > 40
