"""The image and text encoders the quality metrics run on: the user's CLIP and DINO.

A backbone is a folder in Hugging Face layout, as transformers' `save_pretrained` writes
it (the model, its image processor, for CLIP also the tokenizer), given as a local path or
any fsspec URL. A URL is copied once into the weights cache by `memflow.weights.resolve`,
exactly as model weights are. Model, image processor and tokenizer load with
transformers' own loaders (`AutoModel`, `AutoImageProcessor`, `AutoTokenizer`) from local
files only: a folder saved by `CLIPProcessor` or by `CLIPImageProcessor`, by transformers
4 or 5, is read the way transformers reads it. Nothing is ever downloaded from a hub.

Preprocessing follows the loaded image processor (resize, centre crop, mean/std) but runs
in torch on the metric device, so frames decoded on a GPU are scored there in batches
instead of going through PIL one by one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch
import torch.nn.functional as F

from ..weights import resolve

_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor configs write them


class BackboneError(ValueError):
    """A --clip-model / --dino-model that cannot be used; the message names the flag and the fix."""


def _size(value, name: str, flag: str) -> tuple[int, int] | int:
    """An image processor's size: an int, a shortest edge, or a height and width (a dict in
    transformers 4, a SizeDict in 5)."""
    if isinstance(value, int):
        return value
    get = value.get if isinstance(value, dict) else lambda key: getattr(value, key, None)
    if get("shortest_edge"):
        return int(get("shortest_edge"))
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    raise BackboneError(f"{flag}: the image processor's {name} {value!r} is not an int, a shortest edge or a "
                        "height and width")


@dataclass(frozen=True)
class Preprocess:
    """uint8 RGB frames [N, H, W, 3] -> normalised model input [N, 3, h, w]."""

    resize: tuple[int, int] | int | None  # (h, w), or the shortest edge; None keeps the size
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "bicubic"

    @classmethod
    def of(cls, processor, flag: str) -> "Preprocess":
        """The steps a transformers image processor takes (its own attributes, however its
        files spelled them)."""
        on = lambda name, default=False: bool(getattr(processor, name, default))  # noqa: E731
        resize = _size(processor.size, "size", flag) if on("do_resize", True) and processor.size else None
        crop = getattr(processor, "crop_size", None)
        crop = _size(crop, "crop_size", flag) if on("do_center_crop") and crop else None
        if isinstance(crop, int):
            crop = (crop, crop)
        mean, std = (processor.image_mean, processor.image_std) if on("do_normalize", True) else ([0.0] * 3, [1.0] * 3)
        resample = getattr(processor, "resample", 3)
        return cls(resize, crop, tuple(float(m) for m in mean), tuple(float(s) for s in std),
                   _RESAMPLE.get(int(resample if resample is not None else 3), "bicubic"))

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).float() / 255.0
        if self.resize is not None:
            h, w = x.shape[-2:]
            if isinstance(self.resize, int):
                scale = self.resize / min(h, w)
                size = (max(1, int(h * scale)), max(1, int(w * scale)))  # floor, as transformers does
            else:
                size = self.resize
            if size != (h, w) and self.mode == "nearest":
                x = F.interpolate(x, size=size, mode="nearest")
            elif size != (h, w):  # antialiased like PIL's resize, which the processors use
                x = F.interpolate(x, size=size, mode=self.mode, antialias=True, align_corners=False).clamp(0, 1)
        if self.crop is not None:
            h, w = x.shape[-2:]
            ch, cw = min(self.crop[0], h), min(self.crop[1], w)
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _features(output) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output it is (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ImageBackbone:
    """A vision model whose CLS embedding describes a frame (DINO, DINOv2, ViT)."""

    flag = "--dino-model"

    def __init__(self, model, preprocess: Preprocess, source: str):
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]

    @torch.inference_mode()
    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] on any device -> L2-normalised float32 [N, D]."""
        pixels = self.preprocess(frames.to(self.device)).to(next(self.model.parameters()).dtype)
        return F.normalize(self._embed(pixels).float(), dim=-1)


class ClipBackbone(ImageBackbone):
    """CLIP: projected image and text embeddings in one space."""

    flag = "--clip-model"

    def __init__(self, model, preprocess: Preprocess, tokenizer, source: str):
        super().__init__(model, preprocess, source)
        self.tokenizer = tokenizer
        self.max_tokens = model.config.text_config.max_position_embeddings

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    @torch.inference_mode()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> L2-normalised float32 [P, D]; prompts longer than CLIP's context
        (77 tokens for OpenAI's CLIP) are truncated, as every CLIP score does."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(_features(out).float(), dim=-1)


def check_source(source: str, flag: str) -> None:
    """Fail fast, before any actor starts, when a backbone folder is not there: a
    cheap existence check of config.json (the replicas load the model itself)."""
    try:
        fs, path = fsspec.core.url_to_fs(str(source))
        found = fs.exists(path.rstrip("/") + "/config.json")
    except Exception as e:  # an unknown protocol, a missing fsspec backend, no access
        raise BackboneError(f"{flag} {source}: cannot be read ({type(e).__name__}: {e})") from None
    if not found:
        raise BackboneError(f"{flag} {source}: no config.json there; give a folder (local path or URL) in "
                            f"Hugging Face layout, e.g. a save_pretrained() of the model")


def _load(source: str, flag: str, cache_dir) -> tuple[Path, object, Preprocess]:
    from transformers import AutoModel

    try:
        folder = resolve(source, cache_dir)
    except FileNotFoundError:
        raise BackboneError(f"{flag} {source}: no such folder or URL") from None
    if not (folder / "config.json").is_file():
        raise BackboneError(f"{flag} {source}: no config.json there; give a folder in Hugging Face layout")
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BackboneError(f"{flag} {source}: transformers cannot load it: {e}") from None
    try:
        processor = _image_processor(folder)
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise BackboneError(f"{flag} {source}: no image processor that transformers can load ({e}); save the "
                            "model's processor or image processor next to it with save_pretrained") from None
    return folder, model, Preprocess.of(processor, flag)


def _image_processor(folder: Path):
    """The folder's image processor, loaded by transformers. AutoImageProcessor is the way;
    transformers 5.4 to 5.17 refuse it without torchvision (the class it names loads fine
    there), so then the class its config names is loaded, the config read by transformers."""
    import transformers
    from transformers import AutoImageProcessor, ImageProcessingMixin

    try:
        return AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except ImportError:
        config, _ = ImageProcessingMixin.get_image_processor_dict(str(folder), local_files_only=True)
        return getattr(transformers, config["image_processor_type"]).from_pretrained(folder, local_files_only=True)


def load_clip(source: str | os.PathLike, device="cpu", cache_dir=None) -> ClipBackbone:
    """A CLIP model folder (e.g. a save_pretrained of openai/clip-vit-base-patch32)."""
    from transformers import AutoTokenizer

    flag = ClipBackbone.flag
    folder, model, preprocess = _load(str(source), flag, cache_dir)
    if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
        raise BackboneError(f"{flag} {source}: {type(model).__name__} is not a CLIP-style model "
                            f"(it needs both image and text embeddings)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BackboneError(f"{flag} {source}: no usable tokenizer in the folder: {e}") from None
    return ClipBackbone(model.to(device), preprocess, tokenizer, str(source))


def load_dino(source: str | os.PathLike, device="cpu", cache_dir=None) -> ImageBackbone:
    """A DINO-family vision model folder (e.g. facebook/dino-vitb16, facebook/dinov2-base)."""
    flag = ImageBackbone.flag
    _, model, preprocess = _load(str(source), flag, cache_dir)
    if getattr(model, "main_input_name", None) != "pixel_values":
        raise BackboneError(f"{flag} {source}: {type(model).__name__} is not a vision-only model; "
                            f"give a DINO/DINOv2 folder here (CLIP goes to --clip-model)")
    return ImageBackbone(model.to(device), preprocess, str(source))
