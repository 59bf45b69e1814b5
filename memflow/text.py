"""Text encoders: prompts -> [B, text_len, text_dim] context for the Wan transformer.

Both encoders follow Wan's contract: tokens padded/truncated to `text_len`, the
encoder runs with the attention mask, and positions past each prompt's token count
are zeroed. `TinyTextEncoder` is an offline random UMT5 for tests and benchmarks;
`UMT5TextEncoder` loads the real UMT5-XXL from a local directory.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

import ftfy  # noqa: F401  Wan's prompt_clean runs ftfy.fix_text only when ftfy imports: fail here, not silently
import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

TEXT_LEN = 512
_PAD, _EOS, _BYTE0 = 0, 1, 2  # tiny vocabulary: pad, eos, then the 256 byte values


class _TextEncoder(ABC):
    """Runs a UMT5 encoder the Wan way and keeps a bounded LRU of encodings.

    Each new prompt is encoded on its own (not batched with others) so that its
    encoding never depends on which prompts happened to share a call or the cache.
    The cache holds only the unpadded rows, so an entry costs tokens x dim.
    """

    def __init__(self, model: UMT5EncoderModel, text_len: int, cache_size: int):
        self.model = model.eval().requires_grad_(False)
        self.text_len = text_len
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @abstractmethod
    def _tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids [1, text_len], attention_mask [1, text_len])."""

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def text_dim(self) -> int:
        return self.model.config.d_model

    def to(self, device=None, dtype=None):
        self.model.to(device=device, dtype=dtype)
        self._cache.clear()
        return self

    @torch.inference_mode()
    def _encode_one(self, prompt: str) -> torch.Tensor:
        ids, mask = self._tokenize(prompt)
        hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        return hidden[0, : int(mask.sum())].float()

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> float32 [B, text_len, text_dim] on the encoder's device, zero past each prompt's length."""
        out = torch.zeros(len(prompts), self.text_len, self.text_dim, device=self.device)
        for i, prompt in enumerate(prompts):
            key = prompt_clean(prompt)  # Wan's cleaning: ftfy, html unescape, collapsed whitespace
            if key in self._cache:
                self._cache.move_to_end(key)
            else:
                self._cache[key] = self._encode_one(key)
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            emb = self._cache[key]
            out[i, : emb.shape[0]] = emb
        return out


class TinyTextEncoder(_TextEncoder):
    """A small random UMT5 over UTF-8 bytes: needs no files, and gives the same
    weights (hence encodings) in every process, since they come from a fixed seed."""

    def __init__(self, text_dim: int, text_len: int = TEXT_LEN, seed: int = 0, cache_size: int = 64):
        heads = 2
        config = UMT5Config(vocab_size=_BYTE0 + 256, d_model=text_dim, d_kv=text_dim // heads, d_ff=2 * text_dim,
                            num_layers=2, num_heads=heads, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                            pad_token_id=_PAD, eos_token_id=_EOS, decoder_start_token_id=_PAD)
        with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG; keep the caller's
            model = UMT5EncoderModel(config)
        # Explicit init from a local generator: independent of transformers' init scheme.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0)  # RMS norm scales
                else:
                    std = 1.0 if name == "shared.weight" else p.shape[-1] ** -0.5
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        super().__init__(model, text_len, cache_size)

    def _tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = [_BYTE0 + b for b in prompt.encode("utf-8")[: self.text_len - 1]] + [_EOS]
        ids = torch.full((1, self.text_len), _PAD, dtype=torch.long)
        ids[0, : len(tokens)] = torch.tensor(tokens)
        return ids, (ids != _PAD).long()


class UMT5TextEncoder(_TextEncoder):
    """The real UMT5-XXL text encoder of Wan2.1, from local files only."""

    def __init__(self, tokenizer, model: UMT5EncoderModel, text_len: int = TEXT_LEN, cache_size: int = 64):
        self.tokenizer = tokenizer
        super().__init__(model, text_len, cache_size)

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype: torch.dtype = torch.float32,
                        text_len: int = TEXT_LEN) -> "UMT5TextEncoder":
        """path: a diffusers-layout folder (with `tokenizer/` and `text_encoder/`)
        or a folder holding both the tokenizer and the model files."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"text encoder directory {path!r} does not exist")
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(model_dir, dtype=dtype, local_files_only=True).to(device)
        return cls(tokenizer, model, text_len)

    def _tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tokenizer([prompt], padding="max_length", max_length=self.text_len, truncation=True,
                           add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return t.input_ids, t.attention_mask


def build_text_encoder(preset, model_dir: str | None = None, device="cpu",
                       dtype: torch.dtype = torch.float32) -> _TextEncoder:
    """The text encoder a preset calls for: tiny (offline, random) or UMT5-XXL (needs model_dir)."""
    if preset.text_encoder == "tiny":
        return TinyTextEncoder(preset.transformer["text_dim"], preset.text_len).to(device, dtype)
    if preset.text_encoder == "umt5":
        if model_dir is None:
            raise ValueError(f"preset {preset.name!r} uses the UMT5-XXL text encoder: pass the model directory "
                             "that contains `text_encoder/` and `tokenizer/` (e.g. Wan2.1-T2V-1.3B-Diffusers)")
        return UMT5TextEncoder.from_pretrained(model_dir, device, dtype, preset.text_len)
    raise ValueError(f"unknown text encoder kind {preset.text_encoder!r}")
