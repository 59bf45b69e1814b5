"""The frame sink: KV of the first chunk, attended for the whole video (LongLive's global sink)."""
from __future__ import annotations

import torch

from .prototype import frame_means


class FrameSink:
    def __init__(self, num_blocks: int, frames: int, tokens_per_frame: int):
        self.frames = frames
        self.tokens_per_frame = tokens_per_frame
        self.k: list[torch.Tensor | None] = [None] * num_blocks
        self.v: list[torch.Tensor | None] = [None] * num_blocks
        self.means: list[torch.Tensor | None] = [None] * num_blocks

    def held(self, block: int = -1) -> int:
        """Frames of the sink written so far."""
        k = self.k[block]
        return 0 if k is None else k.shape[2] // self.tokens_per_frame

    def write(self, block: int, k: torch.Tensor, v: torch.Tensor, first_frame: int) -> None:
        """Extend the sink with the frames of a fresh clean pass; never overwrite (a
        re-cache after a prompt switch recomputes frames the sink already holds)."""
        held = self.held(block)
        if first_frame != held or held >= self.frames:
            return
        n = (self.frames - held) * self.tokens_per_frame
        k, v = k[:, :, :n], v[:, :, :n]
        if self.k[block] is not None:
            k, v = torch.cat([self.k[block], k], 2), torch.cat([self.v[block], v], 2)
        self.k[block], self.v[block] = k, v
        self.means[block] = frame_means(k, self.tokens_per_frame)
