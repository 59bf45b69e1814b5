"""Text alignment: the CLIP score of frames against their segment's prompt.

MemFlow and LongLive report a CLIP score per prompt segment of a multi-prompt
video (each 10 s clip against its own prompt). Their evaluation code is not
public, so this is the standard CLIP score (Hessel et al. 2021, torchmetrics'
scale) taken per frame and averaged over the segment's frames:

    clip_score(segment) = 1/|S| * sum_{t in S} 100 * max(0, <e_img(x_t), e_txt(prompt)>)

with L2-normalised CLIP embeddings, every decoded frame of the segment counted,
and prompts longer than CLIP's text context truncated. Scores of real CLIP
models land around 20-35; an unrelated prompt scores lower than the right one.
"""
from __future__ import annotations

import torch


def clip_scores(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Per-frame scores: image [N, D] against the text embedding of each frame's prompt [N, D]."""
    return 100 * (image_features * text_features).sum(-1).clamp(min=0)
