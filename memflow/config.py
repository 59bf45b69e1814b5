"""Presets and knobs: model sizes, memory settings, and the defaults of the paper.

A preset bundles everything needed to build a model with random weights (tests,
benchmarks) or with the official dimensions (real weights are loaded on top).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

MemoryMode = Literal["off", "nam", "nam+sma"]
MEMORY_MODES: tuple[str, ...] = ("off", "nam", "nam+sma")
Fidelity = Literal["reference", "paper"]
FIDELITIES: tuple[str, ...] = ("reference", "paper")
# SDPA kernels (memflow/attention.py): auto, FA3 through PyTorch's flash backend, or one forced.
ATTENTION_CHOICES: tuple[str, ...] = ("auto", "fa3", "cudnn", "flash", "efficient", "math")


@dataclass(frozen=True)
class MemoryConfig:
    """The streaming-attention and memory knobs (memflow-algorithm.md, section 6).

    mode: "off" is the memory-free LongLive baseline (sink + window only),
    "nam" adds the memory bank with Narrative Adaptive Memory, "nam+sma" also
    applies Sparse Memory Activation. The default is "nam": the released
    checkpoint was trained and evaluated with SMA off (every reference config
    ships `SMA: False`); SMA is the paper's speed option.

    fidelity: the memory policy (memflow/memory/policy.py). "reference" runs what
    the released checkpoint was trained with (memflow-algorithm.md, section 7);
    "paper" the paper's clean semantics.
    """

    mode: MemoryMode = "nam"
    fidelity: Fidelity = "reference"
    frames_per_chunk: int = 3
    sink_size: int = 3
    local_attn_size: int = 12
    bank_size: int = 3
    record_interval: int = 3
    sma_top_k: int = 3
    context_noise: float = 0.0

    def __post_init__(self):
        if self.mode not in MEMORY_MODES:
            raise ValueError(f"memory mode must be one of {MEMORY_MODES}, got {self.mode!r}")
        if self.fidelity not in FIDELITIES:
            raise ValueError(f"fidelity must be one of {FIDELITIES}, got {self.fidelity!r}")
        if self.sink_size % self.frames_per_chunk or self.local_attn_size % self.frames_per_chunk:
            raise ValueError("sink_size and local_attn_size must be whole numbers of chunks")
        if self.local_attn_size < self.sink_size + self.frames_per_chunk:
            raise ValueError("local_attn_size counts the sink and the current chunk: "
                             "it must be at least sink_size + frames_per_chunk")
        for name in ("frames_per_chunk", "bank_size", "record_interval", "sma_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @property
    def uses_bank(self) -> bool:
        return self.mode != "off"

    @property
    def uses_sma(self) -> bool:
        return self.mode == "nam+sma"

    @property
    def local_frames(self) -> int:
        """Frames of the attention budget besides the sink: past window + the current chunk."""
        return self.local_attn_size - self.sink_size

    @property
    def window_past_frames(self) -> int:
        """Past frames the local window keeps. The budget counts the sink: 12 = 3 sink +
        6 past + 3 own (memflow-algorithm.md, section 2)."""
        return self.local_frames - self.frames_per_chunk


@dataclass(frozen=True)
class Preset:
    """A named model size: transformer dims (diffusers `WanTransformer3DModel`
    kwargs), VAE kwargs (diffusers `AutoencoderKLWan`), text encoder kind and the
    default resolution."""

    name: str
    transformer: dict
    vae: dict
    text_encoder: Literal["tiny", "umt5"]
    height: int
    width: int
    fps: int = 16
    text_len: int = 512
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    @property
    def tokens_per_frame(self) -> int:
        return (self.height // 16) * (self.width // 16)

    def with_memory(self, **changes) -> "Preset":
        return replace(self, memory=replace(self.memory, **changes))


def _wan_dims(layers, heads, head_dim, ffn, text_dim, freq_dim) -> dict:
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=freq_dim,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )


# A Wan VAE with few channels: same architecture, random weights, cheap on CPU.
_TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                 attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
# Official Wan2.1 VAE dims (diffusers' AutoencoderKLWan defaults).
_WAN_VAE: dict = {}

PRESETS: dict[str, Preset] = {
    # Seconds per video on a laptop CPU: for tests, demos and the embedded default.
    "tiny": Preset("tiny", _wan_dims(2, 2, 24, 96, 32, 32), _TINY_VAE, "tiny", height=64, width=64),
    # A CPU benchmark size where attention over [sink | bank | window] is a real share of the time.
    "small": Preset("small", _wan_dims(4, 4, 64, 1024, 256, 64), _TINY_VAE, "tiny", height=128, width=224),
    # Wan2.1-T2V-1.3B: 30 blocks, 12 heads of 128, 480x832 -> 1560 tokens per latent frame.
    "wan2.1-1.3b": Preset("wan2.1-1.3b", _wan_dims(30, 12, 128, 8960, 4096, 256), _WAN_VAE, "umt5",
                          height=480, width=832),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def fingerprint(obj) -> str:
    """A short stable hash of a config (dataclasses / dicts / lists)."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
