"""The script schema: what a user asks for, and how it maps onto chunks.

A script is a list of segments (prompt + seconds). Seconds map to latent frames as
seconds * fps / 4; a prompt switch takes effect at the first chunk that starts at
or after its latent frame, and the total is rounded up to whole chunks
(memflow-algorithm.md, section 5). As in the reference code, at most one switch
happens per chunk: a segment shorter than a chunk still gets one, and the switches
after it wait for the next chunk. Switch points belong to each script: scripts of
different lengths and rhythms can share one replica.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, replace
from typing import Annotated, Optional

from pydantic import (BaseModel, ConfigDict, Field, Strict, StrictInt, StrictStr, ValidationError, field_validator,
                      model_validator)

BENCHMARK_SECONDS_PER_PROMPT = 10.0
MAX_PROMPT_CHARS = 4000
MAX_SEGMENTS = 1000
_ID_OK = re.compile(r"[A-Za-z0-9._-]")
StrictFloat = Annotated[float, Strict()]  # JSON ints are floats too, bools and strings are not


def _unicode_text(v: str, what: str) -> str:
    """Reject strings that cannot be written as UTF-8: a lone UTF-16 surrogate (a JSON
    escape such as \\ud800 without its pair) passes json.loads and fails much later."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text: lone surrogate {v[e.start]!a} at character {e.start} "
                         "(escapes \\ud800-\\udfff must come in high-low pairs)") from None
    return v


@dataclass(frozen=True)
class Limits:
    """Bounds a job puts on each script, so that nothing it accepts can hold a replica for
    ever: total duration, pixels per frame, fps. `for_preset` ties the resolution bound to
    the model's own (twice its height and width); jobs raise them with flags."""

    max_seconds: float = 600.0
    max_pixels: int = 4 * 480 * 832  # twice Wan2.1's 480x832 on each side
    max_fps: int = 60
    preset: str = ""  # named in the resolution error, when the bound comes from a preset

    @classmethod
    def for_preset(cls, preset, **overrides) -> "Limits":
        """Defaults for a `memflow.config.Preset`; None in `overrides` keeps a default."""
        limits = cls(max_pixels=4 * preset.height * preset.width,
                     preset=f"{preset.name} preset's {preset.height}x{preset.width}")
        return replace(limits, **{k: v for k, v in overrides.items() if v is not None})

    def check(self, script: "Script") -> None:
        total = sum(s.seconds for s in script.segments)
        if total > self.max_seconds:
            raise ValueError(f"seconds: the segments add up to {total:g} s, above this job's limit of "
                             f"{self.max_seconds:g} s; shorten or split the script, or raise --max-seconds")
        if script.resolution is not None:
            h, w = script.resolution
            if h * w > self.max_pixels:
                basis = f" (4x the {self.preset})" if self.preset else ""
                raise ValueError(f"resolution: {h}x{w} is {h * w} pixels, above this job's limit of "
                                 f"{self.max_pixels}{basis}; lower it or raise --max-pixels")
        if script.fps > self.max_fps:
            raise ValueError(f"fps: {script.fps} is above this job's limit of {self.max_fps}; "
                             "lower it or raise --max-fps")


class Segment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(..., description="what happens in this segment")
    seconds: StrictFloat = Field(..., description="duration of the segment in seconds")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty; give each segment a text describing it")
        if len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt has {len(v)} characters; keep it under {MAX_PROMPT_CHARS}")
        return _unicode_text(v, "prompt")

    @field_validator("seconds")
    @classmethod
    def _seconds_positive(cls, v: float) -> float:
        if not (v > 0) or math.isinf(v):
            raise ValueError(f"seconds must be a positive finite number, got {v}")
        return v


class Script(BaseModel):
    """One video. Either `segments` or the MemFlow benchmark form `prompts`
    (10 s per prompt) is given, not both."""

    model_config = ConfigDict(extra="forbid")

    id: Optional[StrictStr] = Field(None, description="stable name; derived from the content when absent")
    segments: Optional[list[Segment]] = None
    prompts: Optional[list[StrictStr]] = None
    seed: StrictInt = Field(0, ge=0, lt=2**63)
    resolution: Optional[tuple[StrictInt, StrictInt]] = Field(None, description="(height, width); preset default "
                                                                                "when absent")
    fps: StrictInt = Field(16, ge=1, le=120)

    @model_validator(mode="before")
    @classmethod
    def _benchmark_form(cls, data):
        if isinstance(data, dict) and data.get("prompts") is not None:
            if data.get("segments") is not None:
                raise ValueError("give either 'segments' or 'prompts', not both")
            prompts = data["prompts"]
            if not isinstance(prompts, list):
                raise ValueError("prompts must be a list of strings")
            data = dict(data)
            data["segments"] = [{"prompt": p, "seconds": BENCHMARK_SECONDS_PER_PROMPT} for p in prompts]
            data["prompts"] = None
        return data

    @field_validator("segments")
    @classmethod
    def _has_segments(cls, v):
        if not v:
            raise ValueError("a script needs at least one segment ({'prompt': ..., 'seconds': ...})")
        if len(v) > MAX_SEGMENTS:
            raise ValueError(f"{len(v)} segments; at most {MAX_SEGMENTS}")
        return v

    @field_validator("resolution")
    @classmethod
    def _resolution_ok(cls, v):
        if v is not None:
            h, w = v
            if h <= 0 or w <= 0 or h % 16 or w % 16:
                raise ValueError(f"resolution {h}x{w}: height and width must be positive multiples of 16")
        return v

    @field_validator("id")
    @classmethod
    def _id_ok(cls, v):
        if v is not None and (not v.strip() or len(v) > 512):
            raise ValueError("id must be a non-empty string of at most 512 characters")
        return v if v is None else _unicode_text(v, "id")

    @model_validator(mode="after")
    def _segments_required(self):
        if self.segments is None:
            raise ValueError("a script needs 'segments' (list of {prompt, seconds}) or 'prompts' (list of strings)")
        return self

    @property
    def video_id(self) -> str:
        """A file-name-safe id that cannot escape an output prefix.

        The given id with every character outside [A-Za-z0-9._-] replaced; when
        anything had to change, a short hash of the original keeps ids distinct.
        Without an id: a stable hash of the content, so a manifest maps to the
        same ids on every run."""
        if self.id is None:
            return "s-" + content_hash(self)[:20]
        safe = "".join(c if _ID_OK.match(c) else "_" for c in self.id).lstrip(".")[:96]
        if safe != self.id or not safe:
            safe = f"{safe or 'id'}-{hashlib.sha256(self.id.encode()).hexdigest()[:10]}"
        return safe

    def plan(self, frames_per_chunk: int = 3) -> "Plan":
        return Plan.of(self, frames_per_chunk)


def content_hash(script: Script) -> str:
    body = script.model_dump(exclude={"id"}, mode="json")
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class SegmentPlan:
    index: int
    prompt: str
    start_chunk: int
    end_chunk: int  # exclusive
    start_frame: int  # latent frames, chunk aligned
    end_frame: int
    video_start: int  # decoded video frames
    video_end: int


@dataclass(frozen=True)
class Plan:
    """Where each segment lands in chunks, latent frames and video frames."""

    segments: tuple[SegmentPlan, ...]
    num_chunks: int
    num_latent_frames: int
    frames_per_chunk: int

    @property
    def num_video_frames(self) -> int:
        return 1 + 4 * (self.num_latent_frames - 1)

    def segment_at(self, chunk: int) -> SegmentPlan:
        for seg in self.segments:
            if seg.start_chunk <= chunk < seg.end_chunk:
                return seg
        raise IndexError(chunk)

    @property
    def switch_chunks(self) -> list[int]:
        return [s.start_chunk for s in self.segments[1:]]

    @classmethod
    def of(cls, script: Script, fpc: int) -> "Plan":
        bounds, total = [], 0.0
        for seg in script.segments:
            total += seg.seconds
            bounds.append(round(total * script.fps / 4))  # latent frame where this segment ends
        n = math.ceil(bounds[-1] / fpc)  # the video, in whole chunks
        chunk_bounds = [0]
        for b in bounds[:-1]:  # at most one switch per chunk: a switch waits for the next free chunk
            chunk_bounds.append(max(math.ceil(b / fpc), chunk_bounds[-1] + 1))
        chunk_bounds.append(n)
        plans = []
        for i, seg in enumerate(script.segments):
            a, b = chunk_bounds[i], chunk_bounds[i + 1]
            if b <= a:
                raise ValueError(
                    f"segments[{i}].seconds: no chunk is left for this segment ({len(script.segments)} segments "
                    f"need at least {len(script.segments)} chunks of {fpc * 4 / script.fps:g} s; the video has {n}); "
                    f"lengthen the video or merge short segments")
            fa, fb = a * fpc, b * fpc
            plans.append(SegmentPlan(i, seg.prompt, a, b, fa, fb, max(0, 4 * fa - 3), 4 * fb - 3))
        return cls(tuple(plans), n, n * fpc, fpc)


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, naming the field path, e.g. `segments.1.prompt: ...`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "script"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; allowed: id, segments, prompts, seed, resolution, fps (segments: prompt, seconds)"
        elif e["type"].endswith("_type"):  # strict: say what came instead, never coerce it
            msg += f", got {type(e['input']).__name__} {ascii(e['input'])[:40]}"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


class ScriptError(ValueError):
    """A script that cannot be rendered; the message names the field and the fix."""


def parse_script(data, limits: Limits | None = None) -> Script:
    """Validate a dict (or JSON text) into a Script within `limits` (default `Limits()`),
    raising ScriptError with field names."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise ScriptError(f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ScriptError(f"a script is a JSON object, got {type(data).__name__}")
    try:
        script = Script.model_validate(data)
        (limits or Limits()).check(script)
        script.plan()  # segments too short to hold a chunk are input errors too
    except ValidationError as e:
        raise ScriptError(format_validation_error(e)) from None
    except ValueError as e:
        raise ScriptError(str(e)) from None
    return script
