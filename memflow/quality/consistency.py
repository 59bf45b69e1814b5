"""VBench's subject and background consistency, streamed over a run of frames.

For frame embeddings d_1..d_T (L2-normalised; DINO for subject consistency,
CLIP's image embedding for background consistency):

    consistency = 1/(T-1) * sum_{t=2..T} ( max(0, <d_1, d_t>) + max(0, <d_{t-1}, d_t>) ) / 2

each frame against the first frame of the run and against the frame before it
(VBench, Huang et al. 2024, with its clamp at 0). Identical frames give 1. Only
the first and the previous embedding are kept, so memory does not grow with T.
"""
from __future__ import annotations

import torch


class Consistency:
    """Accumulates the formula above batch by batch; `value` is None before two frames."""

    def __init__(self):
        self.first: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None
        self.total = 0.0
        self.pairs = 0

    def add(self, features: torch.Tensor) -> None:
        """features: the next frames' L2-normalised embeddings [N, D], in order."""
        if features.shape[0] == 0:
            return
        if self.first is None:
            self.first = features[0]
            self.prev, features = features[0], features[1:]
            if features.shape[0] == 0:
                return
        previous = torch.cat([self.prev[None], features[:-1]])
        to_prev = (previous * features).sum(-1).clamp(min=0)
        to_first = (features @ self.first).clamp(min=0)
        self.total += float(((to_prev + to_first) / 2).double().sum())
        self.pairs += features.shape[0]
        self.prev = features[-1]

    @property
    def value(self) -> float | None:
        return self.total / self.pairs if self.pairs else None
