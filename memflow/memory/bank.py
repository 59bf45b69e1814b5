"""The memory bank: at most `bank_size` recorded frames of KV per block, chosen by NAM.

Slots are kept in order; the reference policy can hold the same prototype in
several slots (copies share their tensors)."""
from __future__ import annotations

import torch

from .prototype import Prototype


class MemoryBank:
    def __init__(self, num_blocks: int, capacity: int):
        self.capacity = capacity
        # per block: parallel lists of frame ids, keys, values, mean keys
        self.frames: list[list[int]] = [[] for _ in range(num_blocks)]
        self.k: list[list[torch.Tensor]] = [[] for _ in range(num_blocks)]
        self.v: list[list[torch.Tensor]] = [[] for _ in range(num_blocks)]
        self.means: list[list[torch.Tensor]] = [[] for _ in range(num_blocks)]

    @property
    def full(self) -> bool:
        return len(self.frames[0]) >= self.capacity

    def retain(self, keep: list[list[int]]) -> None:
        """Per block, keep the listed frame ids, in the listed order (an id listed twice
        is held twice)."""
        for l, ids in enumerate(keep):
            pos = [self.frames[l].index(i) for i in ids]
            for name in ("frames", "k", "v", "means"):
                col = getattr(self, name)
                col[l] = [col[l][p] for p in pos]

    def append(self, proto: Prototype) -> None:
        for l in range(len(self.frames)):
            self.frames[l].append(proto.frame)
            self.k[l].append(proto.k[l])
            self.v[l].append(proto.v[l])
            self.means[l].append(proto.means[l])

    def kv(self, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Keys, values [B, H, n*T, D] and mean keys [B, H, n, D] of the block's bank frames."""
        if not self.frames[block]:
            return None
        return (torch.cat(self.k[block], 2), torch.cat(self.v[block], 2), torch.stack(self.means[block], 2))
