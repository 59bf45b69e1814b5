"""Which scaled-dot-product-attention kernel runs the attention.

`auto` lets PyTorch choose among the fused kernels in our order of preference: on a
GPU cuDNN attention, then FlashAttention (FA3 on Hopper when the `flash_attn_interface`
package is installed: PyTorch then routes its flash backend to FA3), then the
memory-efficient kernel, then the math fallback; on a CPU, PyTorch's own choice. A
named backend forces that kernel; `check` tries it once at start-up so a kernel the
machine lacks fails there, with the alternatives named, not mid-video. Passes that
mask keys (the early chunks, re-cache spans) may fall back to a kernel that takes a
mask: FlashAttention takes none.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ATTENTION_CHOICES as CHOICES

log = logging.getLogger(__name__)

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_GPU_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_MASKED_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class AttentionBackend:
    def __init__(self, name: str = "auto"):
        if name not in CHOICES:
            raise ValueError(f"attention backend {name!r}: choose one of {CHOICES}")
        self.name = name
        self.device_type = "cpu"

    def check(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> "AttentionBackend":
        """Set up for `device` and try the kernel on a small input. Raises ValueError naming
        the choices when a forced kernel cannot run here."""
        self.device_type = device.type
        if self.name == "fa3" or (self.name == "auto" and _fa3_usable(device)):
            _activate_fa3(forced=self.name == "fa3")
        q = torch.randn(1, 2, 64, head_dim, device=device, dtype=dtype)
        try:
            with self.context(masked=False):
                F.scaled_dot_product_attention(q, q, q)
        except RuntimeError as e:
            raise ValueError(f"attention backend {self.name!r} cannot run on {device} with {dtype} "
                             f"(head dim {head_dim}): {str(e).splitlines()[0]}; choose another of {CHOICES}") from None
        return self

    def context(self, masked: bool):
        """The kernels to use for one attention call (masked: some keys are masked out)."""
        if self.name == "auto":
            if self.device_type != "cuda":
                return contextlib.nullcontext()
            return sdpa_kernel(_MASKED_ORDER if masked else _GPU_ORDER, set_priority=True)
        forced = BACKENDS.get(self.name, SDPBackend.FLASH_ATTENTION)  # fa3 runs as PyTorch's flash backend
        if masked and forced == SDPBackend.FLASH_ATTENTION:
            return sdpa_kernel(_MASKED_ORDER, set_priority=True)
        return sdpa_kernel([forced])


def _fa3_usable(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
            and importlib.util.find_spec("flash_attn_interface") is not None)


def _activate_fa3(forced: bool) -> None:
    from torch.nn.attention import activate_flash_attention_impl, current_flash_attention_impl

    if current_flash_attention_impl() == "FA3":
        return
    try:
        activate_flash_attention_impl("FA3")
        log.info("attention: FlashAttention-3 active for PyTorch's flash backend")
    except Exception as e:  # the package or the GPU does not support it
        if forced:
            raise ValueError(f"attention backend 'fa3' is not available: {e}; install flash_attn_interface "
                             f"(FlashAttention-3, Hopper GPUs) or choose another of {CHOICES}") from None
        log.info("attention: FlashAttention-3 not available (%s); using PyTorch's flash kernel", e)
