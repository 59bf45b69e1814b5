"""Sparse Memory Activation: per head, attend only the memory frames most relevant to the chunk."""
from __future__ import annotations

import torch


def sma_select(query_mean: torch.Tensor, frame_means: torch.Tensor, top_k: int,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [B, H, k] of the top-k memory frames per head, in memory order.

    query_mean [B, H, D]: mean over the chunk's query tokens; frame_means [B, H, M, D]:
    mean key of each memory frame; valid [M]: the frames that may be chosen (the caller
    makes sure at least top_k are). Relevance is their dot product."""
    relevance = torch.einsum("bhd,bhmd->bhm", query_mean.float(), frame_means.float())
    if valid is not None:
        relevance = relevance.masked_fill(~valid, float("-inf"))
    k = min(top_k, relevance.shape[-1])
    return relevance.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def gather_frames(x: torch.Tensor, idx: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """x [B, H, M*T, D], idx [B, H, k] -> the chosen frames' tokens [B, H, k*T, D]."""
    b, h, _, d = x.shape
    frames = x.view(b, h, -1, tokens_per_frame, d)
    index = idx[..., None, None].expand(-1, -1, -1, tokens_per_frame, d)
    return frames.gather(2, index).flatten(2, 3)
