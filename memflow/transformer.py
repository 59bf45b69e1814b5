"""The causal Wan transformer: diffusers' `WanTransformer3DModel` with a streaming forward.

It subclasses diffusers' model, so its parameters, names and state dicts are exactly
diffusers' (official weights load unchanged), and reuses each block's modules. What
streaming needs is written here: per-frame timesteps, RoPE at the chunk's absolute
frame offset, self-attention over [memory | window | chunk] served by a
`StreamMemory`, and cross-attention keys/values computed once per prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from .attention import AttentionBackend
from .internals import check_transformer
from .rope import apply_rope, rope_tables


@dataclass
class TextContext:
    """A prompt as every block sees it: cross-attention K/V, and NAM's text descriptor."""

    k: list[torch.Tensor]  # per block [B, H, S, D] (after norm_k)
    v: list[torch.Tensor]
    descriptor: torch.Tensor  # [L, H, D] float32, on the device: mean cross-attention key per block/head


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D]"""
    return x.unflatten(2, (heads, -1)).transpose(1, 2)


class CausalWanTransformer(WanTransformer3DModel):
    # how the block halves run (Eager / Compiled) and which SDPA kernels attend: swappable
    execution: "Eager | Compiled"
    attention: AttentionBackend

    @property
    def heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.config.attention_head_dim

    @torch.no_grad()
    def text_context(self, text_embeddings: torch.Tensor) -> TextContext:
        """Project a padded prompt embedding [B, S, text_dim] once; reused by every chunk of its segment."""
        ctx = self.condition_embedder.text_embedder(text_embeddings.to(self.dtype))
        ks, vs = [], []
        for block in self.blocks:
            attn = block.attn2
            ks.append(_heads(attn.norm_k(attn.to_k(ctx)), self.heads))
            vs.append(_heads(attn.to_v(ctx), self.heads))
        descriptor = torch.stack([k[0].float().mean(1) for k in ks])
        return TextContext(ks, vs, descriptor)

    def _modulation(self, timesteps: torch.Tensor):
        """Per-frame time embeddings: timesteps [B, F] -> temb [B, F, D], proj [B, F, 6, D]."""
        ce = self.condition_embedder
        b, f = timesteps.shape
        t = ce.timesteps_proj(timesteps.flatten().float())
        temb = ce.time_embedder(t.to(next(ce.time_embedder.parameters()).dtype)).to(self.dtype)
        proj = ce.time_proj(ce.act_fn(temb))
        return temb.unflatten(0, (b, f)), proj.unflatten(0, (b, f)).unflatten(2, (6, -1))

    @torch.no_grad()
    def forward_chunk(self, latents: torch.Tensor, timesteps: torch.Tensor, frame_start: int,
                      text: TextContext, memory=None) -> torch.Tensor:
        """Predict the flow for a chunk of latent frames [B, C, F, h, w] at per-frame
        timesteps [B, F]. `memory` (a StreamMemory, already told about this pass)
        lays out the keys each block attends and keeps what the pass writes; without
        it the chunk attends to itself only."""
        b, _, f, h, w = latents.shape
        p_t, p_h, p_w = self.config.patch_size
        ph, pw = h // p_h, w // p_w
        cos, sin = rope_tables(self.head_dim, frame_start, f, ph, pw, device=latents.device)
        x = self.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()
        temb, proj = self._modulation(timesteps.to(latents.device))
        for i, block in enumerate(self.blocks):
            x = self._block(i, block, x, proj, (cos, sin), text, memory, f)
        shift, scale = (self.scale_shift_table[None] + temb[:, :, None].float()).unbind(2)
        x = _per_frame(self.norm_out(x.float()), f, lambda y: y * (1 + scale[:, :, None]) + shift[:, :, None])
        x = self.proj_out(x.to(self.dtype))
        x = x.reshape(b, f, ph, pw, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3).float()

    @property
    def compiled(self) -> bool:
        return isinstance(self.execution, Compiled)

    def _block(self, index, block, x, proj, rope, text: TextContext, memory, frames):
        """One block: its two halves run eager or compiled; between them the memory
        (eager bookkeeping) lays out the keys, and after them keeps what the pass writes."""
        run = self.execution
        q, k, v = run.attend_in(block, self.heads, x, proj, rope[0], rope[1], frames)
        keys, values, mask = memory.keys(index, q, k, v) if memory is not None else (k, v, None)
        with self.attention.context(masked=mask is not None):
            x = run.attend_out(block, x, proj, q, keys, values, mask, text.k[index], text.v[index], frames)
        if memory is not None:
            memory.store(index, k, v)
        return x


def _per_frame(x: torch.Tensor, frames: int, fn) -> torch.Tensor:
    """Apply fn to x [B, F*T, D] seen as [B, F, T, D] (per-frame modulation)."""
    b, n, d = x.shape
    return fn(x.view(b, frames, n // frames, d)).view(b, n, d)


def _modulations(block, proj: torch.Tensor):
    """shift, scale, gate, cross shift, cross scale, cross gate: 6 x [B, F, 1, D] float32."""
    return tuple(m[:, :, None] for m in (block.scale_shift_table[None] + proj.float()).unbind(2))


def attend_in(block, heads: int, x, proj, cos, sin, frames: int):
    """First half of a block: modulated norm, then the self-attention's q, k, v
    ([B, H, N, D], RoPE applied to q and k)."""
    shift, scale = _modulations(block, proj)[:2]
    h = _per_frame(block.norm1(x.float()), frames, lambda y: y * (1 + scale) + shift).to(x.dtype)
    attn = block.attn1
    q = apply_rope(attn.norm_q(attn.to_q(h)).unflatten(2, (heads, -1)), cos, sin).transpose(1, 2)
    k = apply_rope(attn.norm_k(attn.to_k(h)).unflatten(2, (heads, -1)), cos, sin).transpose(1, 2)
    return q, k, _heads(attn.to_v(h), heads)


def attend_out(block, x, proj, q, keys, values, mask, text_k, text_v, frames: int):
    """Second half: self-attention over the keys the memory laid out (mask: the slots to
    attend, None for all), gated residual, cross-attention to the prompt, feed-forward."""
    _, _, gate, c_shift, c_scale, c_gate = _modulations(block, proj)
    dtype = x.dtype
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    a = block.attn1.to_out[0](o.transpose(1, 2).flatten(2))
    x = _per_frame(x.float(), frames, lambda y: y + a.view_as(y) * gate).to(dtype)

    h = block.norm2(x.float()).to(dtype)
    attn = block.attn2
    o = F.scaled_dot_product_attention(_heads(attn.norm_q(attn.to_q(h)), q.shape[1]), text_k, text_v)
    x = x + attn.to_out[0](o.transpose(1, 2).flatten(2))

    h = _per_frame(block.norm3(x.float()), frames, lambda y: y * (1 + c_scale) + c_shift).to(dtype)
    ff = block.ffn(h)
    return _per_frame(x.float(), frames, lambda y: y + ff.float().view_as(y) * c_gate).to(dtype)


class Eager:
    """The block halves as plain PyTorch."""

    name = "eager"
    attend_in = staticmethod(attend_in)
    attend_out = staticmethod(attend_out)


class Compiled:
    """The block halves through torch.compile (inductor), whole graphs only (no graph
    breaks): the norm / modulation / RoPE chain fuses, and every block reuses the same
    two graphs per pass shape. `mode="reduce-overhead"` adds CUDA-graph replay."""

    name = "compiled"

    def __init__(self, mode: str | None = None, backend: str = "inductor"):
        # one graph per pass shape (chunk, re-cache spans, masked or not): more than dynamo's default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.attend_in = torch.compile(attend_in, fullgraph=True, dynamic=False, mode=mode, backend=backend)
        self.attend_out = torch.compile(attend_out, fullgraph=True, dynamic=False, mode=mode, backend=backend)


CausalWanTransformer.execution = Eager()
CausalWanTransformer.attention = AttentionBackend()


def place(model: CausalWanTransformer, device=None, dtype=torch.float32) -> CausalWanTransformer:
    """Move to device/dtype, keeping the modules diffusers runs in float32 (norms,
    time embedder, modulation tables) in float32."""
    torch.nn.Module.to(model, device=device, dtype=dtype)
    for name, module in model.named_modules():
        if name.split(".")[-1] in model._keep_in_fp32_modules:
            torch.nn.Module.float(module)
    if isinstance(model.scale_shift_table, torch.nn.Parameter):
        model.scale_shift_table.data = model.scale_shift_table.data.float()
        for block in model.blocks:
            block.scale_shift_table.data = block.scale_shift_table.data.float()
    return model.eval().requires_grad_(False)


def build_transformer(dims: dict, seed: int | None = 0, device=None, dtype=torch.float32) -> CausalWanTransformer:
    """A transformer with random weights (seeded, independent of the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = CausalWanTransformer(**dims)
    check_transformer(model)
    return place(model, device, dtype)

