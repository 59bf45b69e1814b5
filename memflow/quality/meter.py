"""Quality metrics of one video, computed while its decoded frames stream to the encoder.

Frames are scored in batches as they pass (`observe` wraps the frame iterator),
so memory holds one batch and a few embeddings whatever the video's length, and
the metrics cost no second decode. Every metric is reported for the whole video,
for each prompt segment, and (except the CLIP score) for a window around each
prompt switch: `switch_window_s` seconds on either side, kept inside the two
segments, which shows whether the subject and scene survive the switch.

Without a CLIP model the CLIP score and background consistency are None; without
a DINO model subject consistency is None; temporal flickering needs no model. A
metric that fails (a GPU out of memory, say) never costs the video: frames keep
flowing to the encoder, measuring stops and the result carries the error.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator

import numpy as np
import torch

from .alignment import clip_scores
from .backbones import ClipBackbone, ImageBackbone
from .consistency import Consistency
from .flicker import Flicker, frame_differences

log = logging.getLogger(__name__)
METRICS = ("clip_score", "subject_consistency", "background_consistency", "temporal_flickering")
SWITCH_METRICS = METRICS[1:]  # a window across a switch has two prompts: no single CLIP score
BACKBONE_OF = {"clip_score": "clip", "subject_consistency": "dino", "background_consistency": "clip",
               "temporal_flickering": None}  # what each metric is measured with


class _Run:
    """The accumulators of one run of frames [start, end): the video, a segment, a switch window."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.subject, self.background, self.flicker = Consistency(), Consistency(), Flicker()
        self.score_total, self.scored = 0.0, 0

    def add(self, first: int, batch: dict[str, torch.Tensor]) -> None:
        """The batch's frames are first, first + 1, ...; keep those inside the run."""
        a, b = max(self.start, first), min(self.end, first + batch["diff"].shape[0])
        if a >= b:
            return
        rows = slice(a - first, b - first)
        if "dino" in batch:
            self.subject.add(batch["dino"][rows])
        if "clip" in batch:
            self.background.add(batch["clip"][rows])
        if "score" in batch:
            self.score_total += float(batch["score"][rows].double().sum())
            self.scored += b - a
        # a frame's difference is to the frame before it: not counted for the run's first frame
        self.flicker.add(batch["diff"][a - first + (a == self.start):b - first])

    def metrics(self) -> dict:
        return {"clip_score": self.score_total / self.scored if self.scored else None,
                "subject_consistency": self.subject.value, "background_consistency": self.background.value,
                "temporal_flickering": self.flicker.value}


class QualityMeter:
    """segments: (start_frame, end_frame, prompt) per prompt segment, in decoded video
    frames, contiguous from 0 (a record's `segments`, a plan's video_start/video_end)."""

    def __init__(self, segments: list[tuple[int, int, str]], fps: int, clip: ClipBackbone | None = None,
                 dino: ImageBackbone | None = None, batch_size: int = 16, switch_window_s: float = 1.0):
        t0 = time.perf_counter()
        self.clip, self.dino, self.batch_size = clip, dino, batch_size
        self.device = (clip or dino).device if (clip or dino) else torch.device("cpu")
        self.video = _Run(0, segments[-1][1])
        self.segments = [_Run(a, b) for a, b, _ in segments]
        self.window = max(1, round(fps * switch_window_s))
        self.switches = [_Run(max(before.start, after.start - self.window), min(after.end, after.start + self.window))
                         for before, after in zip(self.segments, self.segments[1:])]
        self._bounds = torch.tensor([b for _, b, _ in segments[:-1]], device=self.device)
        self._pending: list[np.ndarray] = []
        self._previous: torch.Tensor | None = None
        self.frames = 0  # measured so far
        self.error: str | None = None
        self._text = self._guarded(lambda: clip.text_features([p for _, _, p in segments])) if clip else None
        self.seconds = time.perf_counter() - t0

    def _guarded(self, measure):
        """Run a measuring step; on failure remember why and measure no further."""
        try:
            return measure()
        except Exception as e:  # the video matters more than its metrics
            self.error = f"{type(e).__name__}: {e}"
            log.warning("quality metrics stopped at frame %d: %s", self.frames, self.error)

    def observe(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Pass uint8 RGB frames [H, W, 3] through unchanged, scoring them on the way."""
        for frame in frames:
            self.add(frame)
            yield frame
        self.finish()

    def add(self, frame: np.ndarray) -> None:
        """Score one frame (in batches); `finish` after the last."""
        self._pending.append(frame)
        if len(self._pending) >= self.batch_size:
            self._flush()

    def finish(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._pending or self.error is not None:
            self._pending = []
            return
        t0 = time.perf_counter()
        self._guarded(lambda: self._measure(torch.from_numpy(np.stack(self._pending)).to(self.device)))
        self._pending = []
        self.seconds += time.perf_counter() - t0

    def _measure(self, frames: torch.Tensor) -> None:
        first = self.frames
        batch = {"diff": frame_differences(frames, self._previous)}
        if self.dino is not None:
            batch["dino"] = self.dino.image_features(frames)
        if self.clip is not None:
            batch["clip"] = self.clip.image_features(frames)
            index = torch.arange(first, first + frames.shape[0], device=self.device)
            segment = torch.bucketize(index, self._bounds, right=True)
            batch["score"] = clip_scores(batch["clip"], self._text[segment])
        for run in (self.video, *self.segments, *self.switches):
            run.add(first, batch)
        self._previous = frames[-1]
        self.frames += frames.shape[0]

    def result(self) -> dict:
        """The record's `quality`: per video, per segment, per switch, and what it cost
        (`error` is set, and every metric None, when measuring failed)."""
        self._flush()
        if self.error is not None:
            return {"video": dict.fromkeys(METRICS), "segments": [], "switches": [], "error": self.error,
                    "backbones": self._backbones(), "frames": self.frames, "seconds": self.seconds}
        return {
            "video": self.video.metrics(),
            "segments": [{"index": i, "start_frame": r.start, "end_frame": r.end, **r.metrics()}
                         for i, r in enumerate(self.segments)],
            "switches": [{"from_segment": i, "to_segment": i + 1, "frame": self.segments[i + 1].start,
                          "start_frame": r.start, "end_frame": r.end,
                          **{k: v for k, v in r.metrics().items() if k in SWITCH_METRICS}}
                         for i, r in enumerate(self.switches)],
            "switch_window_frames": self.window,
            "backbones": self._backbones(),
            "frames": self.frames,
            "seconds": self.seconds,
            "error": None,
        }

    def _backbones(self) -> dict:
        return {"clip": self.clip.source if self.clip else None, "dino": self.dino.source if self.dino else None}
