"""The KV cache of one video: every block's keys and values in one preallocated buffer.

    slots:  [ sink | bank | window ring | pass ]   x tokens (per frame) each

Stacked over blocks, [L, B, H, slots * T, D], allocated at the first pass and written
in place from then on: no buffer grows, nothing is concatenated per pass. A pass
writes its own keys into the slots its layout gives them (the pass region, or the sink
and the local region [window | pass] for the passes that cover them) and attends a view
of the whole buffer, invalid slots masked (early chunks only), or one gather of it
with SMA. The window is a ring: frame f lives in window slot f mod W (attention does
not depend on key order). Mean keys of the memory slots (sink, bank) sit beside it
for NAM and SMA, and the frame each memory slot holds, all on the device.
"""
from __future__ import annotations

import torch

from ..config import MemoryConfig


class KVCache:
    def __init__(self, cfg: MemoryConfig, num_blocks: int, tokens_per_frame: int):
        self.sink_slots = cfg.sink_size
        self.bank_slots = cfg.bank_size if cfg.uses_bank else 0
        self.window_slots = cfg.window_past_frames
        self.pass_slots = cfg.frames_per_chunk
        self.memory_slots = self.sink_slots + self.bank_slots  # SMA's candidates
        self.slots = self.memory_slots + self.window_slots + self.pass_slots
        self.num_blocks = num_blocks
        self.tokens = tokens_per_frame
        self.k: torch.Tensor | None = None  # [L, B, H, slots * T, D]
        self.v: torch.Tensor | None = None
        self.means: torch.Tensor | None = None  # [L, B, H, M, D] float32
        self.slot_frames: torch.Tensor | None = None  # [L, M] frame held by each memory slot (-1: none)
        self._constants: dict = {}

    @property
    def local_slot(self) -> int:
        """First slot of the local region [window | pass] (W + P slots)."""
        return self.memory_slots

    def allocate(self, like: torch.Tensor) -> None:
        """Size the buffers after a block's keys like [B, H, n * T, D]."""
        b, h, _, d = like.shape
        shape = (self.num_blocks, b, h, self.slots * self.tokens, d)
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.means = torch.zeros(self.num_blocks, b, h, self.memory_slots, d, device=like.device)
        self.slot_frames = torch.full((self.num_blocks, self.memory_slots), -1, dtype=torch.long, device=like.device)
        self.slot_frames[:, :self.sink_slots] = torch.arange(self.sink_slots, device=like.device)  # frames 0, 1, 2

    @property
    def allocated(self) -> bool:
        return self.k is not None

    def frames_view(self, x: torch.Tensor) -> torch.Tensor:
        """[..., slots * T, D] seen as [..., slots, T, D]."""
        return x.unflatten(-2, (self.slots, self.tokens))

    def constant(self, key, make) -> torch.Tensor:
        """A small device tensor (mask, slot index) built once per distinct key: the
        steady state reuses the same few, with no host-to-device copy per pass."""
        t = self._constants.get(key)
        if t is None:
            t = self._constants[key] = make().to(self.k.device)
        return t

    def nbytes(self) -> int:
        if not self.allocated:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.means))
