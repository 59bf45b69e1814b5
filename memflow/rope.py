"""3-D rotary position embedding at absolute frame offsets.

diffusers' `WanRotaryPosEmbed` always starts at frame 0 and stops at
`rope_max_seq_len`; a streaming chunk needs frames f..f+F-1 of an unbounded video,
so cached keys keep their absolute positions. The frequencies and their layout
(time | height | width, interleaved cos/sin) are diffusers' own.
"""
from __future__ import annotations

import functools

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed


def _axis_dims(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis(dim: int, start: int, length: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, dim] of positions start..start+length-1, computed on the device in
    float64 (as diffusers does), then float32."""
    pos = torch.arange(start, start + length, dtype=torch.float64, device=device)
    return get_1d_rotary_pos_embed(dim, pos, theta, use_real=True, repeat_interleave_real=True,
                                   freqs_dtype=torch.float64)


@functools.lru_cache(maxsize=16)
def _space(head_dim: int, height: int, width: int, theta: float, device: torch.device):
    """The height and width parts of the table, the same for every chunk: built once per device."""
    _, dh, dw = _axis_dims(head_dim)
    return _axis(dh, 0, height, theta, device), _axis(dw, 0, width, theta, device)


def rope_tables(head_dim: int, frame_start: int, frames: int, height: int, width: int,
                device=None, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos, sin of shape [1, frames*height*width, 1, head_dim] (token grid after
    patching), built on the device: no host-to-device copy per chunk."""
    device = torch.device(device or "cpu")
    dt = _axis_dims(head_dim)[0]
    time = _axis(dt, frame_start, frames, theta, device)
    hs, ws = _space(head_dim, height, width, theta, device)
    parts = []
    for i in range(2):  # 0: cos, 1: sin
        f = time[i].view(frames, 1, 1, -1).expand(frames, height, width, -1)
        h = hs[i].view(1, height, 1, -1).expand(frames, height, width, -1)
        w = ws[i].view(1, 1, width, -1).expand(frames, height, width, -1)
        parts.append(torch.cat([f, h, w], dim=-1).reshape(1, frames * height * width, 1, head_dim))
    return parts[0], parts[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, N, H, D] (float32 math; diffusers uses float64)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)
