"""The frame sink: KV of the video's first frames, attended for the whole video (LongLive's global sink).

It lives in the first slots of the KV cache; this keeps track of what they hold."""
from __future__ import annotations

import torch

from .cache import KVCache
from .prototype import frame_means


class FrameSink:
    def __init__(self, cache: KVCache):
        self.cache = cache
        self.frames = cache.sink_slots
        self.held = 0  # frames [0, held) written by a clean pass

    def write(self, block: int, k: torch.Tensor, v: torch.Tensor, first_frame: int) -> None:
        """Store one block's keys/values [B, H, n * T, D] of frames [first_frame,
        first_frame + n), extending the sink or overwriting it there (the memory policy
        decides when), mean keys included."""
        c, T = self.cache, self.cache.tokens
        n = k.shape[2] // T
        if first_frame + n > self.frames:
            raise ValueError(f"the sink has {self.frames} frames; cannot write frames {first_frame}..{first_frame + n - 1}")
        tokens = slice(first_frame * T, (first_frame + n) * T)
        c.k[block][:, :, tokens] = k
        c.v[block][:, :, tokens] = v
        c.means[block][:, :, first_frame:first_frame + n] = frame_means(k, T)
