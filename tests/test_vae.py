import re

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers.video_processor import VideoProcessor

from memflow.config import PRESETS
from memflow.vae import WanVAE


@pytest.fixture(scope="module")
def vae():
    return WanVAE.from_config(PRESETS["tiny"].vae)


def _latents(n, seed=0):
    return torch.randn(1, 16, n, 8, 8, generator=torch.Generator().manual_seed(seed))


def _reference(vae, latents):
    """What diffusers' WanPipeline + VideoProcessor give, as uint8 [T, H, W, 3]."""
    m = vae.model
    mean = torch.tensor(m.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(m.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        video = m.decode(latents / inv_std + mean, return_dict=False)[0]
    frames = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="np")[0]
    return (frames * 255).round().astype(np.uint8)


def test_stream_equals_full_decode(vae):
    z = _latents(5)
    ref = _reference(vae, z)
    assert ref.shape == (17, 64, 64, 3) and ref.std() > 10  # a non-trivial video
    whole = np.stack(list(vae.decode_stream(z)))
    chunked = np.stack(list(vae.decode_stream(iter(z.split(3, dim=2)))))
    for out in (whole, chunked):
        assert out.dtype == np.uint8 and np.array_equal(out, ref)


def test_streams_do_not_share_state(vae):
    a, b = vae.decode_stream(_latents(2, 1)), vae.decode_stream(_latents(2, 2))
    interleaved = [next(a), next(b), *a, *b]
    assert np.array_equal(np.stack(interleaved[:1] + interleaved[2:6]), _reference(vae, _latents(2, 1)))


def test_stream_is_lazy_over_many_latent_frames(vae):
    consumed = 0

    def latent_source():
        nonlocal consumed
        for z in _latents(40).split(1, dim=2):
            consumed += 1
            yield z

    count = 0
    for f, frame in enumerate(vae.decode_stream(latent_source())):
        latent_index = 0 if f == 0 else (f - 1) // 4 + 1
        assert consumed == latent_index + 1  # nothing read ahead: one latent frame in flight
        assert frame.shape == (64, 64, 3)
        count += 1
    assert count == 1 + 4 * 39


def test_bad_latent_shape(vae):
    with pytest.raises(ValueError, match="expected latents"):
        next(vae.decode_stream(torch.zeros(1, 4, 2, 8, 8)))


def test_from_config_is_seeded_and_keeps_global_rng():
    state = torch.get_rng_state()
    a, b = WanVAE.from_config(PRESETS["tiny"].vae), WanVAE.from_config(PRESETS["tiny"].vae)
    c = WanVAE.from_config(PRESETS["tiny"].vae, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    wa, wb, wc = (v.model.decoder.conv_in.weight for v in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("layout", ["pipeline", "vae_folder"])
def test_from_pretrained_folder(vae, tmp_path, layout):
    target = tmp_path / "vae" if layout == "pipeline" else tmp_path
    vae.model.save_pretrained(target)
    loaded = WanVAE.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    for (k, v), (k2, v2) in zip(vae.model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(v.bfloat16(), v2)


# The original Wan2.1 checkpoint key names, from diffusers' ones (the inverse of
# convert_wan_vae_to_diffusers, which assumes the official 4 levels x 2 res blocks).
_RES = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
        "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _to_original(key):
    def res(rest):
        for new, old in _RES.items():
            if rest.startswith(new):
                return old + rest[len(new):]
        return rest

    if m := re.match(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(.*)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{res(m[3])}"
    if m := re.match(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.*)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key):
        return f"encoder.downsamples.{m[1]}.{res(m[2])}"
    if m := re.match(r"(\w+)\.mid_block\.resnets\.(\d)\.(.*)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{res(m[3])}"
    for new, old in [("mid_block.attentions.0", "middle.1"), ("norm_out", "head.0"), ("conv_out", "head.2"),
                     ("coder.conv_in", "coder.conv1")]:
        key = key.replace(new, old)
    return re.sub(r"^post_quant_conv", "conv2", re.sub(r"^quant_conv", "conv1", key))


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_from_pretrained_single_original_file(tmp_path, suffix):
    cfg = dict(base_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
    src = WanVAE.from_config(cfg, seed=3)
    original = {_to_original(k): v.contiguous() for k, v in src.model.state_dict().items()}
    path = tmp_path / f"Wan2.1_VAE.{suffix}"
    if suffix == "pth":
        torch.save(original, path)
    else:
        safetensors.torch.save_file(original, path)
    loaded = WanVAE.from_pretrained(str(path), config=cfg)
    for k, v in src.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    z = torch.randn(1, 16, 2, 4, 4)
    assert np.array_equal(np.stack(list(src.decode_stream(z))), np.stack(list(loaded.decode_stream(z))))
