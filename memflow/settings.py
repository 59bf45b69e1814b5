"""Typed settings: every option is declared once, as a field of a pydantic model (name,
type, default, allowed values, help), and everything else is derived from the models.

- Command lines: `Settings.parser()` builds the argparse flags from the fields
  (`--max-replicas` for `max_replicas`, choices from a Literal, `--x/--no-x` for a bool).
- Files: `--config FILE` (YAML or TOML) on every command; keys are the option names,
  with `_` or `-`. The command line overrides the file, the file overrides the defaults.
- Provenance: `Resolved.sources` says where each value came from ("default", "file",
  "command line", or a layer a job adds, such as a regression suite).
- Records: the models dump to the `config` blocks of summary.json and of each record.

Values are validated strictly (no `"4"` for an int, no `true` for a number), and a bad key
or value fails before anything starts, naming the key and the reason (`SettingsError`).

The model families are mixins: the engine (`EngineSettings`), its quality backbones,
its H.264 encoding and the limits a script must keep are combined by `python -m memflow
render`, the replicas (cluster/settings.py) and the jobs (jobs/settings.py).
"""
from __future__ import annotations

import argparse
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import ATTENTION_CHOICES, FIDELITIES, MEMORY_MODES, PRESETS

DEFAULT, FILE, COMMAND_LINE = "default", "file", "command line"


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the key and the reason."""


class Settings(BaseModel):
    """A command's settings. Subclasses declare fields with `Field(default, description=help)`;
    `json_schema_extra` may carry `short` (a one-letter flag) and `metavar`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    title: ClassVar[str] = "options"  # the heading of a mixin's flags in --help

    # -- from the command line and a file ----------------------------------------------------
    @classmethod
    def parser(cls, **kwargs) -> argparse.ArgumentParser:
        """An argparse parser with a flag per field and `--config FILE`; given flags only
        (no defaults: what was not given is not in the namespace)."""
        p = argparse.ArgumentParser(argument_default=argparse.SUPPRESS, **kwargs)
        add_flags(p, cls)
        return p

    @classmethod
    def from_command_line(cls, argv: list[str] | None = None, layers: list[tuple[str, dict]] = (), **parser_kwargs
                          ) -> "Resolved":
        """Parse argv (and the --config file it names) into validated settings. A bad flag
        exits 2 with argparse's usage; a bad key or value raises SettingsError."""
        return cls.from_flags(vars(cls.parser(**parser_kwargs).parse_args(argv)), layers)

    @classmethod
    def from_flags(cls, given: dict, layers: list[tuple[str, dict]] = ()) -> "Resolved":
        """The flags given (an argparse namespace's dict, `config` naming the file, if any) over
        the file over `layers` ((source, values) pairs, lowest first) over the defaults."""
        given = dict(given)
        config = given.pop("config", None)
        return cls.resolve([*layers, (FILE, load_file(config, cls) if config else {}), (COMMAND_LINE, given)])

    @classmethod
    def resolve(cls, stack: list[tuple[str, dict]]) -> "Resolved":
        """Validate the layered values (later layers win); every value's source is kept."""
        values, sources = {}, {}
        for source, layer in stack:
            unknown(layer, cls)
            for key, value in layer.items():
                values[key], sources[key] = value, source
        try:
            settings = cls.model_validate(values, strict=True)
        except ValidationError as e:
            raise SettingsError(describe(e, sources)) from None
        return Resolved(settings, {name: sources.get(name, DEFAULT) for name in cls.model_fields})

    def pick(self, model: type["Settings"], **changes) -> "Settings":
        """The values of this model's fields that `model` declares too, as a `model`."""
        values = {k: getattr(self, k) for k in model.model_fields if k in type(self).model_fields}
        return model.model_validate({**values, **changes}, strict=True)


@dataclass(frozen=True)
class Resolved:
    """Settings and where each value came from."""

    settings: Settings
    sources: dict[str, str]

    @classmethod
    def of(cls, settings: Settings, source: str = "caller") -> "Resolved":
        """Settings built in Python: the fields it was given come from `source`."""
        return cls(settings, {k: source if k in settings.model_fields_set else DEFAULT
                              for k in type(settings).model_fields})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(p: argparse.ArgumentParser, model: type[Settings]) -> None:
    """A flag per field, in groups: the command's own options, then each mixin's."""
    p.add_argument("--config", metavar="FILE",
                   help="YAML (.yaml/.yml) or TOML (.toml) file of these options, keys as the option names "
                        "(max_replicas or max-replicas); the command line overrides it")
    owners = [c for c in model.__mro__ if isinstance(c, type) and issubclass(c, Settings) and c is not Settings]
    done: set[str] = set()
    for owner in owners:  # the command itself first, then its mixins
        own = [n for n in owner.__annotations__ if n in model.model_fields and n not in done]
        if not own:
            continue
        group = p if owner is model else p.add_argument_group(owner.title)
        for name in own:
            _add_flag(group, name, model.model_fields[name])
        done.update(own)


def _add_flag(p, name: str, field) -> None:
    extra = field.json_schema_extra or {}
    names = [extra["short"], flag(name)] if "short" in extra else [flag(name)]
    kind, choices = _kind(field.annotation)
    shown = "" if field.is_required() or field.default is None or kind is bool else f" (default {field.default})"
    kwargs: dict[str, Any] = {"dest": name, "help": (field.description or "") + shown}
    if extra.get("positional"):  # a command word: `jobs/dataset.py rebuild`
        p.add_argument(name, choices=choices, help=kwargs["help"])
        return
    if "metavar" in extra:
        kwargs["metavar"] = extra["metavar"]
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind is list:
        kwargs["action"] = "append"
    elif kind is dict:
        kwargs["type"] = _json_object
        kwargs.setdefault("metavar", "JSON")
    elif choices:
        kwargs["choices"] = choices
        kwargs["type"] = type(choices[0])
    else:
        kwargs["type"] = kind
    p.add_argument(*names, **kwargs)


def _kind(annotation) -> tuple[type, tuple]:
    """(base type, choices) of a field: Optional[X] is X, Literal[...] gives choices."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _kind(next(a for a in args if a is not type(None)))
    if typing.get_origin(annotation) is Literal:
        return type(args[0]), args
    origin = typing.get_origin(annotation) or annotation
    return origin, ()


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def load_file(path: str, model: type[Settings]) -> dict:
    """A YAML or TOML file of options: a mapping whose keys are the option names
    (`-` or `_`); a key that names no option fails."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SettingsError(f"--config {path}: cannot be read ({e.strerror or e})") from None
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise SettingsError(f"--config {path}: give a .yaml, .yml or .toml file")
    except (tomllib.TOMLDecodeError, ValueError) as e:
        if isinstance(e, SettingsError):
            raise
        raise SettingsError(f"--config {path}: not valid {p.suffix[1:].upper()}: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise SettingsError(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: must be a mapping of option names to values, got "
                            f"{type(data).__name__}")
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in values:
            raise SettingsError(f"--config {path}: {key!r} is given twice")
        values[name] = value
    try:
        unknown(values, model)
    except SettingsError as e:
        raise SettingsError(f"--config {path}: {e}") from None
    return values


def unknown(values: dict, model: type[Settings]) -> None:
    for key in values:
        if key not in model.model_fields:
            close = difflib.get_close_matches(key, list(model.model_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SettingsError(f"{key}: not an option of this command{hint} (options: "
                                f"{', '.join(sorted(model.model_fields))})")


def describe(err: ValidationError, sources: dict[str, str]) -> str:
    """One line per problem: the key (as a flag, or as a file key), the reason, the value given."""
    parts = []
    for e in err.errors():
        key = str(e["loc"][0]) if e["loc"] else ""
        source = sources.get(key, DEFAULT)
        where = (flag(key) if source == COMMAND_LINE else f"{key} (from the {source})" if source != DEFAULT
                 else key or "settings")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = f"required: give {flag(key)}, or {key} in the --config file"
        elif key and "input" in e and not isinstance(e["input"], dict):
            msg += f", got {type(e['input']).__name__} {ascii(e['input'])[:60]}"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


# -- the engine's settings -----------------------------------------------------------------

def _help(text: str, **extra) -> dict:
    return {"description": text, **({"json_schema_extra": extra} if extra else {})}


class EngineSettings(Settings):
    """What a generator is built from (`MemFlowGenerator.from_settings`)."""

    title: ClassVar[str] = "engine"

    preset: Literal[tuple(PRESETS)] = Field("tiny", **_help("model size: tiny (tests, seconds on a CPU), small (CPU "
                                                             "benchmarks), wan2.1-1.3b (the official dims)"))
    model: Optional[str] = Field(None, **_help("weights: a diffusers Wan folder or URL, optionally with MemFlow's "
                                               "base.pt + lora.pt", metavar="DIR_OR_URL"))
    transformer: Optional[str] = Field(None, **_help("transformer weights overriding --model (a diffusers folder, "
                                                     ".safetensors, .pt, MemFlow base.pt)", metavar="FILE"))
    lora: Optional[str] = Field(None, **_help("MemFlow lora.pt, merged at load", metavar="FILE"))
    memory: Literal[MEMORY_MODES] = Field("nam", **_help(
        "memory: off (memory-free baseline), nam (the memory bank: what the checkpoint was trained with), nam+sma "
        "(also Sparse Memory Activation: faster)"))
    fidelity: Literal[FIDELITIES] = Field("reference", **_help(
        "memory policy: reference (exactly what the released MemFlow checkpoint runs with) or paper (the paper's "
        "clean semantics); see the README"))
    device: Literal["auto", "cpu", "cuda", "gpu"] = Field("auto", **_help(
        "where the engine runs: cuda (one GPU per replica), cpu, or auto (cuda when there is one; for a batch job, "
        "when the cluster has or can add GPUs); gpu is a synonym of cuda"))
    compile: Literal["auto", "on", "off"] = Field("auto", **_help("torch.compile the transformer blocks (auto: on "
                                                                  "a GPU)"))
    attention: Literal[ATTENTION_CHOICES] = Field("auto", **_help(
        "attention kernel (auto: cuDNN, then FlashAttention/FA3, then memory-efficient)"))

    @field_validator("device", mode="before")
    @classmethod
    def _gpu_is_cuda(cls, v):
        return "cuda" if v == "gpu" else v

    @property
    def weights(self) -> dict:
        """Where the weights come from, as the generator's fingerprint names them."""
        return {"model": self.model, "transformer": self.transformer, "lora": self.lora, "seed": 0}

    def fingerprint(self) -> str:
        """What `MemFlowGenerator.from_settings(self).config_fingerprint` will be."""
        from .config import get_preset
        from .pipeline import engine_fingerprint

        preset = get_preset(self.preset).with_memory(mode=self.memory, fidelity=self.fidelity)
        return engine_fingerprint(preset, preset.memory, self.weights)

    @property
    def compile_flag(self) -> bool | None:
        """None: the default for the device (on for GPUs)."""
        return {"auto": None, "on": True, "off": False}[self.compile]


class QualitySettings(Settings):
    """The quality metrics' backbones (memflow/quality)."""

    title: ClassVar[str] = "quality metrics"

    clip_model: Optional[str] = Field(None, **_help(
        "CLIP folder/URL in Hugging Face layout (e.g. a save_pretrained of openai/clip-vit-base-patch32): adds the "
        "per-segment CLIP score and background consistency", metavar="DIR_OR_URL"))
    dino_model: Optional[str] = Field(None, **_help(
        "DINO folder/URL in Hugging Face layout (e.g. facebook/dino-vitb16): adds subject consistency",
        metavar="DIR_OR_URL"))


class EncodeSettings(Settings):
    title: ClassVar[str] = "encoding"

    crf: int = Field(18, ge=0, le=51, **_help(
        "H.264 quality, 0-51; 0 is lossless and bit-reproducible (x264 is not at other settings)"))


class LimitSettings(Settings):
    """Bounds on each script (memflow.script.Limits)."""

    title: ClassVar[str] = "script limits"

    max_seconds: Optional[float] = Field(None, gt=0, **_help("longest video accepted, in seconds, a tree's "
                                                             "flattened nodes each (default 600)"))
    max_pixels: Optional[int] = Field(None, ge=1, **_help(
        "largest resolution accepted, height x width (default: 4x the preset's, twice each side)"))
    max_fps: Optional[int] = Field(None, ge=1, **_help("highest fps accepted (default 60)"))
    max_branches: Optional[int] = Field(None, ge=1, **_help(
        "most videos in one branching script, its root included (default 256)"))

    def limits(self, preset: str):
        """The limits for scripts rendered with `preset`."""
        from .config import get_preset
        from .script import Limits

        return Limits.for_preset(get_preset(preset), max_seconds=self.max_seconds, max_pixels=self.max_pixels,
                                 max_fps=self.max_fps, max_nodes=self.max_branches)
