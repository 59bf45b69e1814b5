"""Tiny CLIP and DINOv2 in Hugging Face layout, built offline for the quality tests.

Both are transformers models from small configs, saved with save_pretrained next
to a real image processor config and (CLIP) a WordLevel tokenizer built with
`tokenizers`. CLIP's random towers get projections solved in closed form so that
frames of a colour and a caption naming it map to the same unit vector (one per
colour): text alignment then has a known answer, ~100 for the right colour and 0
for another. The vocabulary is just the colours, so "a red fox" and "the red sea"
tokenize alike. DINOv2 stays random (consistency needs no semantics).
"""
from __future__ import annotations

from pathlib import Path

import torch

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
IMAGE = 32


def colour_frames(name: str, n: int, size=(64, 64), seed: int = 0) -> torch.Tensor:
    """n uint8 frames [n, H, W, 3] of one colour with mild noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.tensor(COLOURS[name], dtype=torch.float32)
    noise = torch.randn((n, *size, 3), generator=gen) * 12
    return (base + noise).clamp(0, 255).round().to(torch.uint8)


def tokenizer(max_length: int):
    """A CLIP-style fast tokenizer over the colour words (others are <unk>), bos/eos last."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(COLOURS)}}
    bos, eos = len(vocab), len(vocab) + 1  # last ids, as in OpenAI's CLIP vocabulary
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=max_length)


@torch.no_grad()
def _align_colours(model, tokenizer) -> None:
    """Set both projections to W = E pinv(P): the pooled outputs P of each colour's
    frames (mean of a few) and of "a <colour> scene" land on the unit vectors E."""
    from memflow.quality.backbones import Preprocess

    pre = Preprocess(IMAGE, (IMAGE, IMAGE), (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    names = list(COLOURS)
    image = torch.stack([model.vision_model(pixel_values=pre(colour_frames(n, 8, seed=99))).pooler_output.mean(0)
                         for n in names], 1)
    text = model.text_model(**tokenizer([f"a {n} scene" for n in names], return_tensors="pt")).pooler_output.T
    targets = torch.eye(model.config.projection_dim, len(names))
    model.visual_projection.weight.copy_(targets @ torch.linalg.pinv(image))
    model.text_projection.weight.copy_(targets @ torch.linalg.pinv(text))


def save_tiny_clip(folder: Path, seed: int = 0, processor: bool = False) -> Path:
    """`processor`: save the tokenizer and image processor together as a `CLIPProcessor`
    (transformers 5 writes processor_config.json), else each on its own, as 4.x does."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tokenizer(16)
    eos = tok.eos_token_id
    config = CLIPConfig(
        text_config=dict(vocab_size=eos + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=eos - 1,
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
        _align_colours(model, tok)
    model.save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    if processor:
        CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    else:
        tok.save_pretrained(folder)
        images.save_pretrained(folder)
    return folder


def save_tiny_dino(folder: Path, seed: int = 0) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          image_size=IMAGE, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": IMAGE + 4}, crop_size={"height": IMAGE, "width": IMAGE},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder
