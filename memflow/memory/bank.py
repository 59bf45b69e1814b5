"""The memory bank: at most `bank_size` recorded frames of KV per block, chosen by NAM.

It lives in the bank slots of the KV cache; slots are kept in order and filled from
the first. The reference policy can hold the same prototype in several slots. Every
change runs on the device; which frame a slot holds is known there (`cache.slot_frames`)."""
from __future__ import annotations

import torch

from .cache import KVCache
from .prototype import Prototype


class MemoryBank:
    def __init__(self, cache: KVCache):
        self.cache = cache
        self.capacity = cache.bank_slots
        self.fill = 0  # slots [0, fill) hold frames

    @property
    def full(self) -> bool:
        return self.fill >= self.capacity

    @property
    def first_slot(self) -> int:
        return self.cache.sink_slots

    @property
    def frames(self) -> list[list[int]]:
        """Frame ids per block, slot by slot (reads the device: debugging and the ranking service)."""
        if not self.fill:
            return [[] for _ in range(self.cache.num_blocks)]
        s = self.first_slot
        return self.cache.slot_frames[:, s:s + self.fill].tolist()

    def means(self) -> torch.Tensor:
        """Mean keys of the filled slots per block, [L, n, H, D]."""
        s = self.first_slot
        return self.cache.means[:, 0, :, s:s + self.fill].transpose(1, 2)

    def retain(self, keep: torch.Tensor) -> None:
        """Per block l, keep the slots keep[l] ([L, K] positions), in that order, as the first K."""
        c, s = self.cache, self.first_slot
        K = keep.shape[1]
        for buf in (c.k, c.v):
            bank = c.frames_view(buf)[:, :, :, s:s + self.capacity]
            index = keep[:, None, None, :, None, None].expand(-1, *bank.shape[1:3], -1, *bank.shape[4:])
            bank[:, :, :, :K] = bank.gather(3, index)
        means = c.means[:, :, :, s:s + self.capacity]
        means[:, :, :, :K] = means.gather(3, keep[:, None, None, :, None].expand(-1, *means.shape[1:3], -1,
                                                                                means.shape[-1]))
        ids = c.slot_frames[:, s:s + self.capacity]
        ids[:, :K] = ids.gather(1, keep)
        self.fill = K

    def append(self, proto: Prototype) -> None:
        c, slot = self.cache, self.first_slot + self.fill
        c.frames_view(c.k)[:, :, :, slot] = proto.k
        c.frames_view(c.v)[:, :, :, slot] = proto.v
        c.means[:, :, :, slot] = proto.means
        c.slot_frames[:, slot] = proto.frame
        self.fill += 1
