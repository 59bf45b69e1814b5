"""The Wan2.1 VAE decoder, streamed: normalized latents in, uint8 RGB frames out.

The Wan decoder is causal in time: diffusers' `AutoencoderKLWan._decode` already
runs it one latent frame at a time with a cache of the last input frames of each
causal conv. We drive that loop ourselves so that frames leave as soon as their
latent frame arrives and a long video is never held whole (memory stays that of
one latent frame plus the conv caches, whatever the length).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers, load_single_file_checkpoint
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from .internals import check_vae


class WanVAE:
    """A diffusers `AutoencoderKLWan` (Wan2.1 layout) with a streaming decoder."""

    def __init__(self, model: AutoencoderKLWan):
        if model.config.patch_size is not None:
            raise ValueError("patchified (Wan2.2-style) VAEs are not supported; use the Wan2.1 VAE")
        check_vae(model)
        self.model = model.eval().requires_grad_(False)
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in model.decoder.modules())

    @classmethod
    def from_config(cls, vae_kwargs: dict, seed: int = 0) -> "WanVAE":
        """Random weights, the same for a given seed; the caller's RNG state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(AutoencoderKLWan(**vae_kwargs))

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype: torch.dtype = torch.float32,
                        config: dict | None = None) -> "WanVAE":
        """path: a diffusers pipeline folder (with `vae/`), a VAE folder (config.json +
        weights), or an original single-file checkpoint (`Wan2.1_VAE.pth` / .safetensors).

        A single file is converted with diffusers' Wan key mapping, offline:
        `config` gives its `AutoencoderKLWan` kwargs (default: the official Wan2.1 VAE).
        """
        p = Path(path)
        if p.is_file():
            state = convert_wan_vae_to_diffusers(load_single_file_checkpoint(str(p)))
            with torch.device("meta"):
                model = AutoencoderKLWan(**(config or {}))
            model.load_state_dict(state, strict=True, assign=True)
        elif p.is_dir():
            sub = "vae" if (p / "vae").is_dir() else None
            model = AutoencoderKLWan.from_pretrained(p, subfolder=sub, local_files_only=True)
        else:
            raise FileNotFoundError(f"no VAE at {path!r}")
        return cls(model).to(device, dtype)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def to(self, device=None, dtype=None) -> "WanVAE":
        # nn.Module.to: diffusers' own .to warns about fp32 modules this VAE does not have
        torch.nn.Module.to(self.model, device=device, dtype=dtype)
        return self

    def decode_stream(self, latents: torch.Tensor | Iterable[torch.Tensor]) -> Iterator[np.ndarray]:
        """Normalized latents [1, 16, L, h, w], or chunks [1, 16, n, h, w] arriving over
        time -> uint8 RGB frames [8h, 8w, 3]: 1 for the first latent frame, 4 for each next.

        Each call keeps its own conv cache, so several streams may interleave. The
        input iterator is pulled outside inference mode: its tensors stay ordinary.
        """
        decoder = self.decoder()
        for chunk in ([latents] if isinstance(latents, torch.Tensor) else latents):
            yield from decoder.decode(chunk)

    def decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """One video's decoder state (the conv caches): `decode` chunk after chunk; `fork` where
    a story branches (each branch decodes on from the same frames)."""

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.cache = [None] * vae._num_convs
        self.first = True
        cfg = vae.model.config
        self.mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(vae.device, vae.dtype)
        self.std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(vae.device, vae.dtype)

    def fork(self) -> "StreamDecoder":
        other = copy.copy(self)
        other.cache = [c.clone() if isinstance(c, torch.Tensor) else c for c in self.cache]
        return other

    def decode(self, chunk: torch.Tensor) -> list[np.ndarray]:
        """Latents [1, 16, n, h, w] -> the video frames they decode to, in order."""
        z_dim = self.vae.model.config.z_dim
        if chunk.dim() != 5 or chunk.shape[0] != 1 or chunk.shape[1] != z_dim:
            raise ValueError(f"expected latents [1, {z_dim}, n, h, w], got {tuple(chunk.shape)}")
        frames = []
        for i in range(chunk.shape[2]):
            frames.extend(self._decode_frame(chunk[:, :, i:i + 1]))
            self.first = False
        return frames

    @torch.inference_mode()
    def _decode_frame(self, z: torch.Tensor) -> np.ndarray:
        """One latent frame -> uint8 [T, H, W, 3], with the same arithmetic as
        WanPipeline (un-normalize, decode, clamp) and its VideoProcessor (to [0, 1], round)."""
        vae = self.vae
        m = vae.model
        z = z.to(vae.device, vae.dtype) / (1.0 / self.std) + self.mean
        out = m.decoder(m.post_quant_conv(z), feat_cache=self.cache, feat_idx=[0], first_chunk=self.first)
        video = (out.clamp(-1.0, 1.0) * 0.5 + 0.5).clamp(0, 1).float()
        return (video[0].permute(1, 2, 3, 0) * 255).round().to(torch.uint8).contiguous().cpu().numpy()
