"""The local window: KV of the most recent frames, a rolling buffer (oldest frames leave)."""
from __future__ import annotations

import torch


class LocalWindow:
    def __init__(self, num_blocks: int, capacity_frames: int, tokens_per_frame: int):
        self.capacity = capacity_frames
        self.tokens_per_frame = tokens_per_frame
        self.num_blocks = num_blocks
        self.clear()

    def clear(self) -> None:
        self.start = self.end = 0  # frame range [start, end) held
        self.k: list[torch.Tensor | None] = [None] * self.num_blocks
        self.v: list[torch.Tensor | None] = [None] * self.num_blocks

    @property
    def first(self) -> int | None:
        """The oldest frame held, None when empty."""
        return self.start if self.end > self.start else None

    def advance(self, first_frame: int, frames: int) -> None:
        """Declare the frames the coming pass writes; they must follow what is held."""
        if self.end != self.start and first_frame != self.end:
            raise ValueError(f"window holds frames up to {self.end}, cannot append at {first_frame}")
        if self.end == self.start:
            self.start = first_frame
        self.end = first_frame + frames
        self.start = max(self.start, self.end - self.capacity)

    def write(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        keep = (self.end - self.start) * self.tokens_per_frame
        if keep == 0:  # a window of no past frames
            self.k[block] = self.v[block] = None
            return
        if self.k[block] is not None:
            k, v = torch.cat([self.k[block], k], 2), torch.cat([self.v[block], v], 2)
        self.k[block], self.v[block] = k[:, :, -keep:], v[:, :, -keep:]
