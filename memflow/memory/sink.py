"""The frame sink: KV of the video's first frames, attended for the whole video (LongLive's global sink)."""
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
        self.writes = 0  # bumps on every write (invalidates concatenations that include the sink)

    def held(self, block: int = -1) -> int:
        """Frames of the sink written so far."""
        k = self.k[block]
        return 0 if k is None else k.shape[2] // self.tokens_per_frame

    def write(self, block: int, k: torch.Tensor, v: torch.Tensor, first_frame: int) -> None:
        """Store frames [first_frame, first_frame + n) of the sink, extending it or
        overwriting what it holds there (the memory policy decides when)."""
        T, held = self.tokens_per_frame, self.held(block)
        n = k.shape[2] // T
        if first_frame > held or first_frame + n > self.frames:
            raise ValueError(f"sink holds {held} of {self.frames} frames; cannot write frames "
                             f"{first_frame}..{first_frame + n - 1}")
        if self.k[block] is not None:
            old_k, old_v = self.k[block], self.v[block]
            k = torch.cat([old_k[:, :, :first_frame * T], k, old_k[:, :, (first_frame + n) * T:]], 2)
            v = torch.cat([old_v[:, :, :first_frame * T], v, old_v[:, :, (first_frame + n) * T:]], 2)
        self.k[block], self.v[block] = k, v
        self.means[block] = frame_means(k, T)
        self.writes += 1
