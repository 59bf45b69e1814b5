"""The diffusers internals the engine reads, checked once when a model is built.

The streaming forward (memflow/transformer.py) reuses the modules of diffusers'
`WanTransformer3DModel` by name, and the streamed decoder (memflow/vae.py) drives
`AutoencoderKLWan`'s causal decoder loop itself. A diffusers release that renames or
reshapes any of them would otherwise fail deep inside a render, or worse, run and give
different videos. This names what is missing and the versions that were tested.
"""
from __future__ import annotations

import inspect

import diffusers

TESTED = "0.35.2 to 0.42.1"  # the diffusers versions the tests ran on (pyproject.toml, .ci/lowest.txt)

# attribute paths on the transformer, on its first block, and what each must be
_MODEL = ("patch_embedding", "condition_embedder.text_embedder", "condition_embedder.timesteps_proj",
          "condition_embedder.time_embedder", "condition_embedder.time_proj", "condition_embedder.act_fn",
          "norm_out", "proj_out", "scale_shift_table", "blocks", "_keep_in_fp32_modules")
_BLOCK = ("norm1", "norm2", "norm3", "ffn", "scale_shift_table", "attn1.to_q", "attn1.to_k", "attn1.to_v",
          "attn1.norm_q", "attn1.norm_k", "attn1.to_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.norm_q",
          "attn2.norm_k", "attn2.to_out")


class UnsupportedDiffusers(RuntimeError):
    """The installed diffusers does not have what the engine reads."""


def _missing(obj, paths) -> list[str]:
    out = []
    for path in paths:
        value = obj
        for name in path.split("."):
            value = getattr(value, name, None)
        if value is None:
            out.append(path)
    return out


def _fail(what: str) -> None:
    raise UnsupportedDiffusers(f"diffusers {diffusers.__version__}: {what}; this engine reads diffusers' Wan "
                               f"internals and was tested with diffusers {TESTED}: install one of those "
                               f"(pip install 'diffusers>=0.35.2,<=0.42.1')")


def check_transformer(model) -> None:
    """The modules `forward_chunk` uses, with the shapes it assumes (per-block modulation
    table [1, 6, dim], the output's [1, 2, dim])."""
    missing = _missing(model, _MODEL) + [f"blocks.0.{p}" for p in _missing(model.blocks[0], _BLOCK)]
    if missing:
        _fail(f"WanTransformer3DModel has no {', '.join(missing)}")
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    for name, table, rows in (("scale_shift_table", model.scale_shift_table, 2),
                              ("blocks.0.scale_shift_table", model.blocks[0].scale_shift_table, 6)):
        if tuple(table.shape) != (1, rows, dim):
            _fail(f"WanTransformer3DModel.{name} is {tuple(table.shape)}, not (1, {rows}, {dim})")


def check_vae(model) -> None:
    """The causal decoder loop `StreamDecoder` drives: decoder(x, feat_cache, feat_idx, first_chunk)."""
    params = inspect.signature(model.decoder.forward).parameters
    missing = [p for p in ("feat_cache", "feat_idx", "first_chunk") if p not in params]
    missing += _missing(model, ("post_quant_conv", "config.latents_mean", "config.latents_std"))
    if missing:
        _fail(f"AutoencoderKLWan's decoder has no {', '.join(missing)}")
