"""The local window: KV of the most recent past frames, a ring in the KV cache (oldest frames leave).

Frame f lives in window slot f mod capacity; this keeps track of which frames are held
and writes a pass's frames into their slots."""
from __future__ import annotations

import torch

from .cache import KVCache


class LocalWindow:
    def __init__(self, cache: KVCache):
        self.cache = cache
        self.capacity = cache.window_slots
        self.clear()

    def clear(self) -> None:
        self.start = self.end = 0  # frame range [start, end) held

    @property
    def first(self) -> int | None:
        """The oldest frame held, None when empty."""
        return self.start if self.end > self.start else None

    def slot(self, frame: int) -> int:
        return self.cache.local_slot + frame % self.capacity

    def held_slots(self) -> list[int]:
        return [self.slot(f) for f in range(self.start, self.end)]

    def advance(self, first_frame: int, frames: int) -> None:
        """Declare the frames the coming pass writes; they must follow what is held."""
        if self.end != self.start and first_frame != self.end:
            raise ValueError(f"window holds frames up to {self.end}, cannot append at {first_frame}")
        if self.end == self.start:
            self.start = first_frame
        self.end = first_frame + frames
        self.start = max(self.start, self.end - self.capacity)

    def write(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """One block's keys/values [B, H, n * T, D] of the frames `advance` declared (the
        last n); the newest `capacity` of them go to their ring slots, in runs."""
        T, c = self.cache.tokens, self.cache
        n = k.shape[2] // T
        f = max(self.start, self.end - n)
        while f < self.end and self.capacity:
            run = min(self.end - f, self.capacity - f % self.capacity)
            src = slice((f - (self.end - n)) * T, (f - (self.end - n) + run) * T)
            dst = slice(self.slot(f) * T, (self.slot(f) + run) * T)
            c.k[block][:, :, dst] = k[:, :, src]
            c.v[block][:, :, dst] = v[:, :, src]
            f += run
