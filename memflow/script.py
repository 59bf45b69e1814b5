"""The script schema: what a user asks for, and how it maps onto chunks.

A script is a list of segments (prompt + seconds, and optionally a seed from which the
noise restarts). A script may branch: `branches` are continuations of its story, each with
its own id and segments (and branches of its own), and every node is a video of the story
up to its end (`nodes()` flattens them: every ancestor's segments, then its own). A
script may also continue a video rendered before (`continues`), which the batch job
resolves into the parent's story followed by the new segments.

Segments map onto chunks as follows. Seconds map to latent frames as
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

from pydantic import (BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

BENCHMARK_SECONDS_PER_PROMPT = 10.0
MAX_PROMPT_CHARS = 4000
MAX_SEGMENTS = 1000
MAX_DEPTH = 32  # branches inside branches
_ID_OK = re.compile(r"[A-Za-z0-9._-]")
_ID_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,95}")  # ids safe_id keeps as they are
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
    max_nodes: int = 256  # videos in one branching script, its root included
    preset: str = ""  # named in the resolution error, when the bound comes from a preset

    @classmethod
    def for_preset(cls, preset, **overrides) -> "Limits":
        """Defaults for a `memflow.config.Preset`; None in `overrides` keeps a default."""
        limits = cls(max_pixels=4 * preset.height * preset.width,
                     preset=f"{preset.name} preset's {preset.height}x{preset.width}")
        return replace(limits, **{k: v for k, v in overrides.items() if v is not None})

    def check(self, script: "Script") -> None:
        nodes = script.nodes()
        if len(nodes) > self.max_nodes:
            raise ValueError(f"branches: the script has {len(nodes)} nodes (videos of its story, the root included), "
                             f"above this job's limit of {self.max_nodes}; split the tree or raise --max-branches")
        for node in nodes:
            total = sum(s.seconds for s in node.script.segments)
            if total > self.max_seconds:
                where = "" if node.parent is None else f"branch {node.video_id!r}: "
                ancestors = "" if node.parent is None else " (its ancestors' included)"
                raise ValueError(f"seconds: {where}the segments add up to {total:g} s{ancestors}, above this job's "
                                 f"limit of {self.max_seconds:g} s; shorten or split the script, or raise --max-seconds")
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
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63, description=(
        "from this segment's first chunk on, noise comes from a generator seeded by (script seed, this seed)"))

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


def _check_id(v: str, what: str = "id") -> str:
    if not v.strip() or len(v) > 512:
        raise ValueError(f"{what} must be a non-empty string of at most 512 characters")
    return _unicode_text(v, what)


def safe_id(given: str) -> str:
    """A file-name-safe id that cannot escape an output prefix: every character outside
    [A-Za-z0-9._-] replaced; when anything had to change, a short hash of the original
    keeps ids distinct."""
    if _ID_SAFE.fullmatch(given):  # most ids (a million a manifest): no character to look at twice
        return given
    safe = "".join(c if _ID_OK.match(c) else "_" for c in given).lstrip(".")[:96]
    if safe != given or not safe:
        safe = f"{safe or 'id'}-{hashlib.sha256(given.encode()).hexdigest()[:10]}"
    return safe


def _segments_ok(v):
    if not v:
        raise ValueError("needs at least one segment ({'prompt': ..., 'seconds': ...})")
    if len(v) > MAX_SEGMENTS:
        raise ValueError(f"{len(v)} segments; at most {MAX_SEGMENTS}")
    return v


class Branch(BaseModel):
    """A continuation of its parent's story: played after the parent's segments, with the
    root's seed, resolution and fps."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr = Field(..., description="the video id of this node (required)")
    segments: list[Segment] = Field(..., description="played after the parent's")
    branches: list["Branch"] = Field(default_factory=list)
    video: StrictBool = Field(True, description="false: no video of the story up to this node's end")

    @field_validator("id")
    @classmethod
    def _id_ok(cls, v):
        return _check_id(v)

    @field_validator("segments")
    @classmethod
    def _has_segments(cls, v):
        return _segments_ok(v)


@dataclass(frozen=True)
class Node:
    """One video of a story: the flattened script (every ancestor's segments, then its own;
    the root's seed, resolution and fps), its tree parent, and whether it is rendered."""

    video_id: str
    parent: Optional[str]
    script: "Script"
    video: bool
    depth: int


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
    branches: list[Branch] = Field(default_factory=list, description="continuations of this story, each a video")
    video: StrictBool = Field(True, description="false: no video of the story up to the root's end")
    continues: Optional[StrictStr] = Field(None, description="a video id (in the job's output) or a record URL "
                                                             "whose story this script continues")

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
        return _segments_ok(v)

    @field_validator("resolution")
    @classmethod
    def _resolution_ok(cls, v):
        if v is not None:
            h, w = v
            if h <= 0 or w <= 0 or h % 16 or w % 16:
                raise ValueError(f"resolution {h}x{w}: height and width must be positive multiples of 16")
        return v

    @field_validator("id", "continues")
    @classmethod
    def _id_ok(cls, v, info):
        return v if v is None else _check_id(v, info.field_name)

    @model_validator(mode="after")
    def _segments_required(self):
        if self.segments is None:
            raise ValueError("a script needs 'segments' (list of {prompt, seconds}) or 'prompts' (list of strings)")
        if self.continues is not None and "seed" in self.model_fields_set:
            raise ValueError("seed: a continuation takes its parent's seed; give its segments a 'seed' instead")
        self._tree_ok()
        return self

    def _tree_ok(self) -> None:
        """Ids unique inside the tree, depth bounded."""
        seen: dict[str, str] = {}
        stack = [(b, 1, f"branches.{i}") for i, b in enumerate(self.branches)]
        while stack:
            branch, depth, where = stack.pop()
            if depth > MAX_DEPTH:
                raise ValueError(f"{where}: branches nest {depth} deep; at most {MAX_DEPTH}")
            vid = safe_id(branch.id)
            if vid in seen or (self.id is not None and vid == safe_id(self.id)):
                raise ValueError(f"{where}.id: duplicate id {branch.id!r} in this tree "
                                 f"({seen.get(vid, 'the root')} has it too); give each node its own id")
            seen[vid] = where
            stack += [(b, depth + 1, f"{where}.branches.{i}") for i, b in enumerate(branch.branches)]

    @property
    def video_id(self) -> str:
        """A file-name-safe id that cannot escape an output prefix.

        The given id with every character outside [A-Za-z0-9._-] replaced; when
        anything had to change, a short hash of the original keeps ids distinct.
        Without an id: a stable hash of the content, so a manifest maps to the
        same ids on every run."""
        if self.id is None:
            return "s-" + content_hash(self)[:20]
        return safe_id(self.id)

    def plan(self, frames_per_chunk: int = 3) -> "Plan":
        return Plan.of(self, frames_per_chunk)

    @property
    def is_tree(self) -> bool:
        return bool(self.branches)

    def nodes(self) -> list[Node]:
        """Every video of this story, root first, depth first: each with its flattened script."""
        root = self.flat()
        out = [Node(root.video_id, None, root, self.video, 0)]
        stack = [(b, root, 1) for b in reversed(self.branches)]
        while stack:
            branch, parent, depth = stack.pop()
            flat = parent.model_copy(update={"id": branch.id, "segments": [*parent.segments, *branch.segments]})
            out.append(Node(flat.video_id, parent.video_id, flat, branch.video, depth))
            stack += [(b, flat, depth + 1) for b in reversed(branch.branches)]
        return out

    def flat(self) -> "Script":
        """This script without its branches (and, once resolved, without `continues`): one video."""
        if not self.branches and self.video and self.continues is None:
            return self
        flat = self.model_copy(update={"branches": [], "video": True, "continues": None})
        return flat if self.id is not None else flat.model_copy(update={"id": self.video_id})

    def continued(self, parent: "Script") -> "Script":
        """A continuation resolved against its parent's (flattened) script: the parent's
        segments, then this script's, with the parent's seed, resolution and fps."""
        if self.continues is None:
            raise ValueError("not a continuation")
        update = {"segments": [*parent.segments, *self.segments], "seed": parent.seed,
                  "resolution": parent.resolution, "fps": parent.fps, "continues": None}
        resolved = self.model_copy(update=update)
        return resolved if self.id is not None else resolved.model_copy(update={"id": resolved.video_id})


def canonical(script: Script) -> dict:
    """The script as JSON, without the fields at their defaults that older scripts did not
    have (segment seeds, branches, video, continues): content hashes of scripts written
    before stories existed stay what they were."""
    body = script.model_dump(mode="json")
    for key, default in (("branches", []), ("video", True), ("continues", None)):
        if body.get(key) == default:
            body.pop(key)
    body["segments"] = [{k: v for k, v in s.items() if k != "seed" or v is not None} for s in body["segments"]]
    return body


def content_hash(script: Script) -> str:
    body = canonical(script)
    body.pop("id", None)
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


def _allowed(loc: tuple) -> str:
    """The fields a location in a script may have, for an unknown-field error."""
    model = Script
    for part in loc[:-1]:
        if part == "segments":
            model = Segment
        elif part == "branches":
            model = Branch
    return ", ".join(name for name in model.model_fields if name != "prompts") + (", prompts" if model is Script else "")


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, naming the field path, e.g. `segments.1.prompt: ...`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "script"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field; allowed here: {_allowed(e['loc'])}"
        elif e["type"].endswith("_type"):  # strict: say what came instead, never coerce it
            msg += f", got {type(e['input']).__name__} {ascii(e['input'])[:40]}"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


class ScriptError(ValueError):
    """A script that cannot be rendered; the message names the field and the fix."""


def check_script(script: Script, limits: Limits | None = None) -> None:
    """Within `limits`, and every node's segments long enough to hold a chunk; raises
    ScriptError. A continuation is checked once resolved (its parent's segments count)."""
    try:
        (limits or Limits()).check(script)
        for node in script.nodes():
            try:
                node.script.plan()
            except ValueError as e:
                raise ValueError(str(e) if node.parent is None else f"branch {node.video_id!r}: {e}") from None
    except ValueError as e:
        raise ScriptError(str(e)) from None


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
    except ValidationError as e:
        raise ScriptError(format_validation_error(e)) from None
    except ValueError as e:
        raise ScriptError(str(e)) from None
    if script.continues is None:
        check_script(script, limits)
    return script
