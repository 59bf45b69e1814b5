"""Prototypes: the KV of one recorded latent frame, for every block."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def frame_means(k: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Mean key of each frame: k [B, H, F*T, D] -> [B, H, F, D] (float32).

    This one descriptor per frame serves NAM (the mean of dot products is the dot
    product of means) and SMA (relevance to the chunk's mean query)."""
    b, h, n, d = k.shape
    return k.float().view(b, h, n // tokens_per_frame, tokens_per_frame, d).mean(dim=3)


@dataclass
class Prototype:
    """Recorded during a chunk's clean-context pass; joins the bank before a later chunk.
    Its tensors stay on the device, one buffer for all blocks."""

    frame: int
    k: torch.Tensor  # [L, B, H, T, D], keys after RoPE
    v: torch.Tensor
    means: torch.Tensor  # [L, B, H, D] float32

    def descriptor(self) -> torch.Tensor:
        """[L, H, D] float32 on the CPU: what a ranking service needs to know about this frame
        (a copy: the prototype's buffers are reused by the next recording)."""
        return self.means[:, 0].to("cpu", copy=True)
