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
    """Recorded during a chunk's clean-context pass; joins the bank before the next chunk."""

    frame: int
    k: list[torch.Tensor]  # per block [B, H, T, D], keys after RoPE
    v: list[torch.Tensor]
    means: list[torch.Tensor]  # per block [B, H, D] float32

    def descriptor(self) -> torch.Tensor:
        """[L, H, D] float32 on the CPU: what a ranker needs to know about this frame."""
        return torch.stack([m[0] for m in self.means]).cpu()
