"""Checkpoint loading for the MemFlow transformer: any path or fsspec URL, any of
the layouts the released weights come in, and LoRA merged once at load.

Real checkpoints arrive as diffusers folders, single files in the original Wan
key names (`blocks.0.self_attn.q.weight`), or MemFlow / Self-Forcing training
dumps (`base.pt` = {"generator": state_dict}, `lora.pt` = {"generator_lora":
peft_state_dict}). Everything is renamed to diffusers `WanTransformer3DModel`
names, so one strict `load_state_dict` covers them all and a wrong file fails
loudly, naming the keys at fault.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import fsspec
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load_file
from torch import nn

from .config import PRESETS

DEFAULT_CACHE_DIR = Path("~/.cache/memflow")

# Looked for inside a folder (and its transformer/ subfolder), first hit wins.
_FOLDER_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
# Entries of training checkpoints that hold the weights, in order of preference.
_CONTAINER_ENTRIES = ("generator", "generator_lora", "state_dict", "model", "module")
# Prefixes that wrappers (Self-Forcing's WanDiffusionWrapper, DDP, PEFT, ComfyUI) put on every key.
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "model.", "module.", "transformer.")
# Wrapper modules (FSDP, activation checkpointing, torch.compile) that can sit anywhere in a name.
_WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
# Module names that exist only in the original Wan layout (diffusers renames all of them).
_WAN_NAMES = re.compile(
    r"(^|\.)(self_attn|cross_attn|modulation|ffn\.[02]|head\.head|time_embedding|text_embedding|time_projection)(\.|$)"
)
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(\.[^.]+)?\.weight")


class WeightsError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model."""


def resolve(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of `source`: a local path / file:// URL as is, any other fsspec URL
    (s3://, gs://, http(s)://, memory://, ...) downloaded once into `cache_dir`.

    A download (file or folder) lands in a temporary folder that is renamed into
    place only once complete, so an interrupted copy is never mistaken for a
    cached one. The cache is keyed by the URL: a changed remote file needs a new
    URL or a cleared cache.
    """
    fs, path = fsspec.core.url_to_fs(str(source))
    if isinstance(fs, LocalFileSystem):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such checkpoint: {source}")
        return Path(path)
    cache = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    entry = cache / hashlib.sha256(str(source).encode()).hexdigest()[:24]
    name = path.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"
    if not entry.exists():
        if not fs.exists(path):
            raise FileNotFoundError(f"no such checkpoint: {source}")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=cache))
        try:
            if fs.isdir(path):
                fs.get(path.rstrip("/") + "/", str(tmp / name), recursive=True)
            else:
                fs.get(path, str(tmp / name))
            try:
                os.rename(tmp, entry)
            except OSError:
                if not entry.exists():  # otherwise another process finished the same download first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry / name


def read_state_dict(path: str | os.PathLike, entry: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file or folder, with wrapper prefixes stripped.

    Files: .safetensors, or .pt/.pth/.bin/.ckpt read with `weights_only=True` (a
    pickle that would run code is refused). Folders: a diffusers model folder,
    single or sharded, or a pipeline root holding one in transformer/; also a
    PEFT adapter folder. Training checkpoints are unwrapped: `entry` picks e.g.
    "generator_ema"; by default the first of generator, generator_lora,
    state_dict, model, module. Key names are not converted (see `to_diffusers`).
    """
    path = Path(path)
    files = _folder_files(path) if path.is_dir() else [path]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_unwrap(_read_file(file), entry, file))
    state = {_WRAPPERS.sub("", k): v for k, v in state.items()}
    while prefix := next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def is_wan_layout(keys) -> bool:
    """True for original Wan names (`blocks.0.self_attn.q.weight`), False for diffusers ones."""
    return any(_WAN_NAMES.search(k) for k in keys)


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` in diffusers `WanTransformer3DModel` names, renamed with diffusers' own
    Wan converter when it is in the original layout (LoRA keys included)."""
    return convert_wan_transformer_to_diffusers(dict(state)) if is_wan_layout(state) else dict(state)


def load_transformer_weights(
    model: nn.Module,
    source: str | os.PathLike,
    lora: str | os.PathLike | None = None,
    lora_alpha: float | None = None,
    strict: bool = True,
    entry: str | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Load the checkpoint at `source` (path or URL, any layout) into `model`, then
    merge the LoRA at `lora` if given. Tensors are cast to the model's dtype and
    device. Missing/unexpected keys (when `strict`) and shape mismatches raise a
    WeightsError naming them. Returns `load_state_dict`'s missing/unexpected keys.
    """
    path = resolve(source, cache_dir)
    raw = read_state_dict(path, entry)
    state = to_diffusers(raw)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape))
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        raise WeightsError(_mismatch_message(path, model, state, missing, unexpected, mismatched)
                           + _renamed_note(raw))
    result = model.load_state_dict(state, strict=strict)
    if lora is not None:
        merge_lora(model, lora, lora_alpha, cache_dir)
    return result


def merge_lora(model: nn.Module, source: str | os.PathLike, alpha: float | None = None,
               cache_dir: str | os.PathLike | None = None) -> None:
    """Fold a PEFT LoRA into the model's Linear weights: W += alpha / rank * B @ A,
    computed in float32 and cast back, so inference runs at base-model speed.

    The rank comes from A's shape; alpha from the argument, else an
    adapter_config.json beside the file, else alpha = rank (scale 1, as in
    MemFlow's release). Every LoRA key must land on a Linear of the model.
    """
    path = resolve(source, cache_dir)
    raw = read_state_dict(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, tensor in to_diffusers(raw).items():
        match = _LORA_KEY.fullmatch(key)
        if match:
            pairs.setdefault(match["module"], {})[match["ab"]] = tensor
        else:
            stray.append(key)
    modules = dict(model.named_modules())
    stray += [name for name, ab in pairs.items()
              if not isinstance(modules.get(name), nn.Linear) or ab.keys() != {"A", "B"}]
    if stray:
        raise WeightsError(f"{path}: {len(stray)} LoRA keys match no Linear of {type(model).__name__} "
                           f"(or lack their A/B partner): {_first(sorted(stray))}" + _renamed_note(raw))
    misfits = [f"{name}: A {tuple(ab['A'].shape)}, B {tuple(ab['B'].shape)}, weight {tuple(modules[name].weight.shape)}"
               for name, ab in pairs.items()
               if ab["A"].shape[0] != ab["B"].shape[1]
               or (ab["B"].shape[0], ab["A"].shape[1]) != modules[name].weight.shape]
    if misfits:  # checked before any merge so a bad file never leaves the model half-merged
        raise WeightsError(f"{path}: {len(misfits)} LoRA pairs do not fit their Linear: {_first(misfits)}")
    config = _adapter_config(source, path, cache_dir)
    if alpha is None:
        alpha = config.get("lora_alpha")
    with torch.no_grad():
        for name, ab in pairs.items():
            weight = modules[name].weight
            rank = ab["A"].shape[0]
            scale = (rank if alpha is None else alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)
            delta = ab["B"].to(weight.device, torch.float32) @ ab["A"].to(weight.device, torch.float32)
            weight.copy_(weight.float() + scale * delta)


def _folder_files(folder: Path) -> list[Path]:
    for sub in (folder, folder / "transformer"):
        for name in _FOLDER_FILES:
            file = sub / name
            if file.is_file():
                if name.endswith(".index.json"):
                    shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
                    return [sub / shard for shard in shards]
                return [file]
    raise WeightsError(f"{folder} holds no model weights: looked for {', '.join(_FOLDER_FILES)} "
                       f"in it and in its transformer/ subfolder")


def _read_file(file: Path):
    if file.suffix == ".safetensors":
        return load_file(file)
    if file.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise WeightsError(f"{file}: unknown checkpoint format; expected .safetensors, .pt, .pth, .bin, "
                           f".ckpt or a diffusers folder")
    try:  # mmap needs the zip format of torch.save; older pickles are read whole
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as error:
        raise WeightsError(f"{file}: refused; it holds objects other than tensors and plain containers, "
                           f"and loading it could run code. Details: {error}") from None


def _unwrap(obj, entry: str | None, file: Path) -> dict[str, torch.Tensor]:
    if entry is not None:
        if not isinstance(obj, dict) or entry not in obj:
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise WeightsError(f"{file} has no entry {entry!r} (it has {found})")
        obj = obj[entry]
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = next((e for e in _CONTAINER_ENTRIES if e in obj), None)
        if found is None:
            break
        obj = obj[found]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        found = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(f"{file} holds no state dict of tensors (found {found}); "
                           f"pass entry= to pick the right one")
    return obj


def _adapter_config(source, path: Path, cache_dir) -> dict:
    """adapter_config.json beside the LoRA file (or inside its folder), fetched too for URLs."""
    config = (path if path.is_dir() else path.parent) / "adapter_config.json"
    if not config.exists() and not path.is_dir() and "://" in str(source):
        try:
            config = resolve(str(source).rsplit("/", 1)[0] + "/adapter_config.json", cache_dir)
        except FileNotFoundError:
            return {}
    return json.loads(config.read_text()) if config.exists() else {}


def _mismatch_message(path, model, state, missing, unexpected, mismatched) -> str:
    lines = [f"{path} does not fit {type(model).__name__}:"]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"  {len(keys)} {label} keys: {_first(keys)}")
    if mismatched:
        shapes = [f"{k} is {a} in the checkpoint but {b} in the model" for k, a, b in mismatched]
        lines.append(f"  {len(mismatched)} shape mismatches: {_first(shapes)}")
    lines.append(_size_hint(model, state))
    return "\n".join(line for line in lines if line)


def _size_hint(model, state) -> str:
    """Which preset the checkpoint was made for, when its size differs from the model's."""
    try:
        blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        dims = (blocks, state["patch_embedding.weight"].shape[0], state["blocks.0.ffn.net.0.proj.weight"].shape[0])
    except (KeyError, ValueError):
        return ""
    cfg = getattr(model, "config", None)
    if cfg is not None and dims == (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.ffn_dim):
        return ""
    size = f"  the checkpoint has {dims[0]} blocks of width {dims[1]} (ffn {dims[2]})"
    for preset in PRESETS.values():
        t = preset.transformer
        if dims == (t["num_layers"], t["num_attention_heads"] * t["attention_head_dim"], t["ffn_dim"]):
            return f"{size}: build the model with preset {preset.name!r}"
    return f"{size}, which matches no preset"


def _renamed_note(raw) -> str:
    return "\n  (names above were converted from the file's original Wan names)" if is_wan_layout(raw) else ""


def _first(items: list, n: int = 10) -> str:
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
