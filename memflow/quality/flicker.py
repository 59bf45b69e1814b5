"""Temporal flickering from pixels (no model), VBench's definition:

    temporal_flickering = 1 - ( 1/(T-1) * sum_{t=2..T} mean_{pixels, channels} |x_t - x_{t-1}| ) / 255

over uint8 RGB frames x_1..x_T: 1 for a still video, lower the more consecutive
frames differ. It cannot tell flicker from motion, so it compares renders of the
same scripts (regressions, ablations) better than it ranks unrelated videos.
"""
from __future__ import annotations

import torch


def frame_differences(frames: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Mean absolute difference of each uint8 frame [N, H, W, 3] to the frame before it,
    exact (integer sums), float64 [N]; a video's first frame (previous None) gets NaN."""
    x = frames.to(torch.int16)
    before = x[:-1] if previous is None else torch.cat([previous[None].to(torch.int16), x[:-1]])
    after = x[1:] if previous is None else x
    diffs = (after - before).abs().sum(dim=(1, 2, 3), dtype=torch.int64).double() / frames[0].numel()
    if previous is None:
        diffs = torch.cat([diffs.new_full((1,), float("nan")), diffs])
    return diffs


class Flicker:
    """Accumulates the mean difference of consecutive frames within a run of frames."""

    def __init__(self):
        self.total = 0.0
        self.pairs = 0

    def add(self, differences: torch.Tensor) -> None:
        """differences: `frame_differences` of frames whose previous frame is in the same run."""
        self.total += float(differences.sum())
        self.pairs += differences.shape[0]

    @property
    def value(self) -> float | None:
        return 1.0 - self.total / self.pairs / 255.0 if self.pairs else None
